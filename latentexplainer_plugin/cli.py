"""The ``latentexplainer`` command line: demo, explain, train-vae, train-demo, make-data, plugins.

Exit codes: 0 every latent has a result; 1 some latents failed; 2 bad input (nothing was run);
130 interrupted (finished latents are kept; rerun with --resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input, found before any expensive work."""


def _add_explain_options(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--out", default=default_out, required=default_out is None, help="run directory to write")
    p.add_argument("--backend", default="offline", help="offline | openai:MODEL | hf:PATH_OR_ID | a plugin's backend")
    p.add_argument("--samples", type=int, default=5, help="answers per latent (n); default 5")
    p.add_argument("--bias", default="disentanglement", help="inductive bias: disentanglement | combination | conditional | a plugin's")
    p.add_argument("--similarity", default="embed", help="certainty measure: embed (sentence embeddings) | bow (bag of words)")
    p.add_argument("--threshold", type=float, default=None, help="certainty threshold in [0,1] (default: per similarity)")
    p.add_argument("--strengths", default=None, help="comma-separated traversal values (default -3,-1.5,0,1.5,3)")
    p.add_argument("--latents", default=None, help="comma-separated latent indices to explain (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base latents")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run with other settings in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentexplainer", description="Explain what the latents of a generative model mean.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="explain every latent of the shipped demo VAE (offline)")
    _add_explain_options(p, "latentexplainer-demo")

    p = sub.add_parser("explain", help="explain the latents of a model")
    p.add_argument("--model", required=True, help="model directory (train-vae output) or hub id")
    p.add_argument("--adapter", default="vae", help="vae | a plugin's adapter")
    p.add_argument("--site", default=None, help="latent site, e.g. decoder.input or mid_block.output (default: per architecture)")
    p.add_argument("--data", default=None, help="npz with images (and factors) to measure KL and captured factors")
    _add_explain_options(p, None)

    p = sub.add_parser("train-vae", help="train a beta-TCVAE on an npz of images")
    p.add_argument("--data", required=True, help="npz with images (N,H,W,3) uint8, optional factors and factor_names")
    p.add_argument("--out", required=True, help="directory for config.json and model.safetensors")
    p.add_argument("--latents", type=int, default=10)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--beta", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train-demo", help="regenerate the shipped demo weights (seeded, reproducible)")
    p.add_argument("--out", default=None, help="where to write them (default: the package's demo/weights)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("make-data", help="write a procedural shapes dataset as npz")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("plugins", help="list registered adapters, backends, biases and direction finders")
    return parser


def _parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    return values


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated integers, got {text!r}") from None


def check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device!r}: supported device types are cpu, cuda and mps")
    return device


def _validate_explain(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before loading a model or calling a backend."""
    from .adapters.base import check_strengths
    from .components import parse_backend_spec
    from .plugins import UnknownComponentError, registry
    from .uncertainty import get_similarity

    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    try:
        name, _ = parse_backend_spec(args.backend)
        registry("backends").get(name)
        registry("biases").get(args.bias)
        if getattr(args, "adapter", None):
            registry("adapters").get(args.adapter)
        get_similarity(args.similarity)
        strengths = _parse_floats(args.strengths, "strengths")
        if strengths is not None:
            check_strengths(strengths)
    except (UnknownComponentError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    check_device(args.device)
    out = Path(args.out)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise UsageError(f"--out {out}: {probe} is not writable")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    return {"strengths": strengths, "latents": _parse_ints(args.latents, "latents")}


def _explain(args: argparse.Namespace, model: Any, adapter: str | None, header: dict[str, Any], stats: Any,
             checked: dict[str, Any], adapter_options: dict[str, Any] | None = None) -> int:
    from .adapters.base import DEFAULT_STRENGTHS
    from .attribution import LatentExplainer
    from .run import explain_to_dir, summarize

    try:
        explainer = LatentExplainer(
            model, backend=args.backend, bias=args.bias, samples=args.samples, similarity=args.similarity,
            threshold=args.threshold, strengths=checked["strengths"] or DEFAULT_STRENGTHS, seed=args.seed,
            adapter=adapter, adapter_options=adapter_options,
        )
        targets = checked["latents"]
        if targets is not None:
            explainer._targets(targets)
    except (ValueError, IndexError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    started = time.perf_counter()
    data = explain_to_dir(explainer, args.out, target=targets, stats=stats, header=header,
                          resume=args.resume, force=args.force, progress=not args.quiet)
    text, code = summarize(data)
    print(text)
    print(f"wrote {Path(args.out) / 'results.json'} and report.html in {time.perf_counter() - started:.1f} s")
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    checked = _validate_explain(args)
    from .demo import demo_data, load_demo_model
    from .run import latent_stats

    model = load_demo_model(device="cpu")
    data = demo_data()
    stats = latent_stats(model, data["images"], data["factors"], [str(n) for n in data["factor_names"]])
    return _explain(args, model.to(args.device), "vae", {"model": "latentexplainer demo VAE (shapes, 10 latents)"}, stats, checked)


def cmd_explain(args: argparse.Namespace) -> int:
    checked = _validate_explain(args)
    from .data import load_npz
    from .run import latent_stats

    data = load_npz(args.data) if args.data else None
    from .adapters.vae import load_vae

    model_path = Path(args.model)
    if args.adapter == "vae":
        if not model_path.exists():
            raise UsageError(f"--model {args.model}: no such directory (a VAE directory holds config.json and model.safetensors)")
        model = load_vae(model_path, device=args.device)
        stats = None
        if data is not None and hasattr(model, "encode"):
            stats = latent_stats(model, data["images"], data.get("factors"), data.get("factor_names"))
    else:
        model = args.model
        stats = None
    options = {"site": args.site} if args.site else {}
    return _explain(args, model, args.adapter, {"model": str(args.model)}, stats, checked, options)


def cmd_train_vae(args: argparse.Namespace) -> int:
    from .data import load_npz
    from .demo.model import ConvVAEConfig
    from .demo.train import TrainConfig, train_vae

    if args.steps < 1 or args.latents < 1 or args.batch_size < 2:
        raise UsageError("--steps and --latents must be >= 1 and --batch-size >= 2")
    data = load_npz(args.data)
    images = data["images"]
    try:
        mcfg = ConvVAEConfig(latent_dim=args.latents, image_size=images.shape[1], channels=images.shape[3])
    except ValueError as exc:
        raise UsageError(f"{args.data}: {exc}") from None
    model, history = train_vae(images, mcfg, TrainConfig(steps=args.steps, beta=args.beta, batch_size=args.batch_size, seed=args.seed),
                               progress=not args.quiet)
    extra = {"training": {"steps": args.steps, "beta": args.beta, "seed": args.seed, "data": str(args.data), "final": history[-1]}}
    if "factor_names" in data:
        extra["factor_names"] = data["factor_names"]
    model.save_pretrained(args.out, extra=extra)
    print(f"saved {args.out} (final loss {history[-1]['loss']:.1f})")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from .demo import WEIGHTS_DIR
    from .demo.build import build_demo

    out = Path(args.out) if args.out else WEIGHTS_DIR
    report = build_demo(out, steps=args.steps, progress=not args.quiet)
    print(json.dumps(report, indent=2))
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    import numpy as np

    from .demo.shapes import make_dataset

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    np.savez_compressed(args.out, **make_dataset(args.n, seed=args.seed))
    print(f"wrote {args.out} ({args.n} images)")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import KINDS, registry

    for kind in KINDS:
        reg = registry(kind)
        print(f"{kind}:")
        for name in reg.names():
            e = reg.entries[name]
            print(f"  {name:<16} {e.distribution} ({e.plugin})")
        for kept, dropped in reg.conflicts:
            print(f"  ! {dropped.name} from {dropped.distribution} ignored: name taken by {kept.distribution}")
    return 0


COMMANDS = {"demo": cmd_demo, "explain": cmd_explain, "train-vae": cmd_train_vae, "train-demo": cmd_train_demo,
            "make-data": cmd_make_data, "plugins": cmd_plugins}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .backends.base import BackendError
    from .safe_load import LoadError
    from .store import RunStoreError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, LoadError, RunStoreError, BackendError) as exc:
        print(f"latentexplainer {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f" Finished latents are saved in {out}; rerun the same command with --resume to continue." if out else ""
        print(f"\nlatentexplainer {args.command}: interrupted.{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
