"""``latentexplainer train-vae`` and ``train-demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import in_flag_words


def cmd_train_vae(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..data import load_npz
    from ..models.conv_vae import ConvVAEConfig
    from ..models.training import beta_from_normalized, default_train_config, latent_report, train_vae

    if args.steps < 1 or args.latents < 1 or args.batch_size < 2:
        raise UsageError("--steps and --latents must be >= 1 and --batch-size >= 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; give a new or existing directory for the model")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, so no directory can be made under it")
    if not os.access(probe, os.W_OK):
        raise UsageError(f"--out {out}: {probe} is not writable")
    data = load_npz(args.data)
    images = data["images"]
    try:
        mcfg = ConvVAEConfig(latent_dim=args.latents, image_size=images.shape[1], channels=images.shape[3])
        beta = args.beta if args.beta is not None else beta_from_normalized(args.beta_norm, mcfg.image_size, mcfg.channels, mcfg.latent_dim)
        overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "beta": beta, "seed": args.seed,
                     "free_bits": args.free_bits, "capacity": args.capacity, "capacity_weight": args.capacity_weight,
                     "recon_scale": args.recon_scale, "threads": args.threads, "stop_on_collapse": args.stop_on_collapse,
                     "capacity_steps": args.capacity_steps if args.capacity_steps is not None else args.steps // 2}
        if args.free_bits_steps is not None:
            overrides["free_bits_steps"] = args.free_bits_steps
        if args.warmup_steps is not None:
            overrides["warmup_steps"] = args.warmup_steps
        cfg = default_train_config(mcfg.image_size, mcfg.channels, mcfg.latent_dim, **overrides)
    except ValueError as exc:
        raise UsageError(f"{exc}") from None
    started = time.perf_counter()
    model, history = train_vae(images, mcfg, cfg, progress=not args.quiet)
    seconds = time.perf_counter() - started
    report = latent_report(model, images, data.get("factors"), data.get("factor_names"), seed=args.seed)
    training = asdict(cfg) | {"beta_norm": args.beta_norm if args.beta is None else None, "data": str(args.data),
                              "threads_used": history[-1]["threads"], "seconds": round(seconds, 1),
                              "steps_per_second": round(history[-1]["step"] / max(history[-1]["seconds"], 1e-9), 2),
                              "stopped_early": history[-1]["stopped_early"], "final": history[-1]} | report
    extra = {"training": training}
    if "factor_names" in data:
        extra["factor_names"] = data["factor_names"]
    model.save_pretrained(out, extra=extra)
    _print_latent_report(report)
    print(f"saved {out} ({history[-1]['step'] + 1} steps in {seconds / 60:.1f} min, {training['threads_used']} thread(s); "
          f"final loss {history[-1]['loss']:.1f})")
    if report["warning"]:
        bar = "!" * 78
        print(f"{bar}\nlatentexplainer train-vae: warning: {in_flag_words(report['warning'])}\n{bar}", file=sys.stderr)
    return 0


def _print_latent_report(report: dict[str, Any]) -> None:
    captured = {c["latent"]: c for c in report.get("captured", [])}
    print(f"active latents (KL > {report['kl_active_threshold']} nats): {report['n_active']} of "
          f"{len(report['kl_per_latent'])}: {', '.join(f'z{i}' for i in report['active_latents']) or 'none'}")
    for i, kl in enumerate(report["kl_per_latent"]):
        line = f"  z{i}: KL {kl:7.3f} nats  {'active' if i in report['active_latents'] else 'collapsed'}"
        if i in captured:
            c = captured[i]
            line += f"  captures {c['factor']} (NMI {c['nmi']:.2f})" if c["factor"] else "  captures nothing"
        print(line)
    if "captured_factors" in report:
        print(f"factors captured: {len(report['captured_factors'])}: {', '.join(report['captured_factors']) or 'none'}")


def cmd_train_demo(args: argparse.Namespace) -> int:
    from ..demo import WEIGHTS_DIR
    from ..demo.build import build_demo

    out = Path(args.out) if args.out else WEIGHTS_DIR
    report = build_demo(out, steps=args.steps, progress=not args.quiet)
    print(json.dumps(report, indent=2))
    return 0
