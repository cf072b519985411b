"""``latentexplainer make-data``: write a procedural shapes dataset."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UsageError


def cmd_make_data(args: argparse.Namespace) -> int:
    import numpy as np

    if args.dataset == "shapes2":
        from ..data.shapes2 import make_dataset
    elif args.dataset == "shapes3":
        from ..data.shapes3 import make_dataset
    else:
        from ..data.shapes import make_dataset

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    # numpy adds .npz to a name without it; say (and check) the path really written.
    if not str(args.out).strip():
        raise UsageError("--out must name the .npz file to write, got ''")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory; give a file name, e.g. {Path(args.out) / 'shapes.npz'}")
    out = Path(args.out if str(args.out).endswith(".npz") else f"{args.out}.npz")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name, e.g. {out / 'shapes.npz'}")
    # a missing directory is created (like train-vae and explain create theirs); a file in the way is refused
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"--out {out}: {blocker} is a file, so no directory can be made under it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create {out.parent} ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out {out}: {out.parent} is not writable")
    from .. import safe_io

    try:
        safe_io.check_target(out)  # a link or special file at --out: refused before generating anything
        arrays = make_dataset(args.n, seed=args.seed)
        # streamed into a no-follow temp file renamed over `out` (numpy would follow a link at `out`)
        with safe_io.atomic_writer(out) as f:
            np.savez_compressed(f, **arrays)
    except safe_io.UnsafePathError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} ({args.n} images)")
    return 0
