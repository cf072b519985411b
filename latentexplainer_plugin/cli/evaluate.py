"""``latentexplainer evaluate`` (explain, then score against the data's factors) and ``calibrate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from .explain import cmd_explain
from .parser import build_parser


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``explain`` (same options, same run directory) then score it against the npz's factors.

    Explain options that evaluate does not define take the defaults of ``latentexplainer explain``,
    so the explain step sees exactly the namespace that command would build."""
    from ..data import load_npz
    from ..evaluation.harness import EVALUATION_JSON, EVALUATION_MD, ROC_PNG, evaluate_run, summary_lines

    base = build_parser().parse_args(["explain", "--model", str(args.model), "--out", str(args.out)])
    for key, value in (vars(base) | vars(args)).items():
        setattr(args, key, value)
    args.adapter = "vae"
    if getattr(args, "rank_by", None) or getattr(args, "top_k", None):
        raise UsageError("--rank-by/--top-k: evaluate explains every latent (or --latents); ranking is not part of it")
    if args.max_images is not None and args.max_images < 10:
        raise UsageError(f"--max-images must be >= 10, got {args.max_images}")
    data = load_npz(args.data, need_factors=True)
    code = cmd_explain(args)
    if code not in (0, 1):
        return code
    from ..adapters.vae import load_vae
    from ..safe_io import UnsafePathError

    model = load_vae(args.model, device="cpu", allow_pickle=getattr(args, "allow_pickle", False))
    if not hasattr(model, "encode"):
        raise UsageError(f"--model {args.model}: evaluate needs a VAE with an encoder")
    try:
        ev = evaluate_run(args.out, model, data, data_path=str(args.data), max_images=args.max_images, seed=args.seed)
    except UnsafePathError as exc:
        raise UsageError(str(exc)) from None
    print("\n".join(summary_lines(ev)))
    print(f"wrote {Path(args.out) / EVALUATION_JSON}, {EVALUATION_MD} and {ROC_PNG}")
    return code


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``latentexplainer calibrate --runs DIR [DIR ...] [--out FILE]``."""
    from ..evaluation.calibration import calibrate_runs

    try:
        report = calibrate_runs(args.runs, out=args.out)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for backend, per in report["thresholds"].items():
        for sim, entry in per.items():
            h = entry["held_out"]
            print(f"{backend}/{sim}: threshold {entry['threshold']:.3f} from {entry['n']} latents "
                  f"({entry['n_positive']} capture a factor); held out ({h['scheme']}): accuracy {h['accuracy']:.3f}, "
                  f"balanced {h['balanced_accuracy']:.3f}")
    for problem in report.get("skipped", []):
        print(f"skipped {problem}")
    print(f"wrote {report['path']}")
    return 0
