"""Rebuild the shipped demo weights: the same data, the same seed, the same recipe."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import DEMO_SEED, DEMO_TRAIN_SIZE, demo_data
from ..models.conv_vae import ConvVAEConfig
from ..data.shapes import make_dataset
from ..models.training import TrainConfig, train_vae

DEMO_MODEL = ConvVAEConfig(latent_dim=10, image_size=64, channels=3)
DEMO_TRAIN = TrainConfig(steps=10000, batch_size=128, lr=1e-3, beta=6.0, seed=DEMO_SEED, threads=1)  # 1 thread: bitwise reproducible anywhere


def build_demo(out: str | Path, steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the demo VAE from scratch into ``out`` and return a summary (KL and factor per latent)."""
    from ..models.statistics import latent_stats

    started = time.perf_counter()
    data = make_dataset(DEMO_TRAIN_SIZE, seed=DEMO_SEED)
    cfg = TrainConfig(**{**DEMO_TRAIN.__dict__, "steps": steps or DEMO_TRAIN.steps})
    model, history = train_vae(data["images"], DEMO_MODEL, cfg, progress=progress)
    held_out = demo_data()
    stats = latent_stats(model, held_out["images"], held_out["factors"], [str(n) for n in held_out["factor_names"]])
    summary = {
        "latents": [stats.extras(i) for i in range(model.latent_dim)],
        "training": {"steps": cfg.steps, "beta": cfg.beta, "seed": cfg.seed, "images": DEMO_TRAIN_SIZE,
                     "final": history[-1], "seconds": round(time.perf_counter() - started, 1)},
    }
    model.save_pretrained(out, extra={"factor_names": [str(n) for n in data["factor_names"]], "training": summary["training"]})
    return summary
