"""What is known about each latent of a VAE from data: KL to the prior and the factor it captures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .conv_vae import ConvVAE, images_to_tensor

KL_ACTIVE = 0.05  # nats: below this a latent is treated as collapsed


@dataclass
class LatentStats:
    """What is known about each latent from data: KL to the prior and the factor it captures."""

    kl: np.ndarray  # (D,)
    factors: list[Any] | None = None  # FactorMatch per latent, when the data has factors

    def extras(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"kl": round(float(self.kl[index]), 4), "active": bool(self.kl[index] > KL_ACTIVE)}
        if self.factors is not None:
            m = self.factors[index]
            out["factor"] = {"name": m.factor, "score": round(m.score, 4), "metric": m.metric}
        return out


def latent_stats(model: Any, images: np.ndarray, factors: np.ndarray | None = None,
                 factor_names: Sequence[str] | None = None) -> LatentStats:
    """KL per latent (and captured factors when ``factors`` are given) of a VAE with ``encode``."""
    from ..data import check_images_fit

    config = getattr(model, "config", None)
    check_images_fit(images, getattr(config, "image_size", None), getattr(config, "channels", None))
    kl = latent_kl(model, images)
    matches = None
    if factors is not None:
        from .factors import captured_factors

        names = list(factor_names) if factor_names is not None else [f"factor{k}" for k in range(factors.shape[1])]
        codes = encode_means(model, images)
        matches = captured_factors(codes, factors, names)
        for m in matches:  # a collapsed latent captures nothing, whatever noise says
            if kl[m.latent] <= KL_ACTIVE:
                m.factor = None
    return LatentStats(kl, matches)


@torch.no_grad()
def latent_kl(model: ConvVAE, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """Mean KL(q(z_d|x) || N(0,1)) per latent dimension over ``images``: ~0 means collapsed."""
    total = torch.zeros(model.latent_dim)
    for start in range(0, len(images), batch):
        mu, logvar = model.encode(images_to_tensor(images[start : start + batch]))
        total += (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(0)
    return (total / len(images)).numpy()


@torch.no_grad()
def encode_means(model: ConvVAE, images: np.ndarray, batch: int = 512) -> np.ndarray:
    out = [model.encode(images_to_tensor(images[s : s + batch]))[0] for s in range(0, len(images), batch)]
    return torch.cat(out).numpy()
