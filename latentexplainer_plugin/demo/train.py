"""Train a beta-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs").

The ELBO's KL term is split into index-code mutual information, total correlation (TC) and
dimension-wise KL; TC is weighted by ``beta``. log q(z) and prod_j log q(z_j) are estimated
with minibatch-weighted sampling (their eq. (S5)).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import ConvVAE, ConvVAEConfig


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 6.0  # weight of the total-correlation term
    alpha: float = 1.0  # weight of the mutual-information term
    gamma: float = 1.0  # weight of the dimension-wise KL term
    seed: int = 0
    threads: int = 2


def _gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 * torch.exp(-logvar))


def tcvae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
               dataset_size: int, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    b = x.shape[0]
    rec = F.binary_cross_entropy(recon, x, reduction="sum") / b
    log_qz_x = _gaussian_log_density(z, mu, logvar).sum(1)  # (B,)
    log_pz = _gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    # mat[i, j, d] = log q(z_i[d] | x_j)
    mat = _gaussian_log_density(z[:, None], mu[None], logvar[None])
    log_norm = math.log(b * dataset_size)
    log_qz = torch.logsumexp(mat.sum(2), dim=1) - log_norm
    log_prod_qzi = (torch.logsumexp(mat, dim=1) - log_norm).sum(1)
    mi = (log_qz_x - log_qz).mean()
    tc = (log_qz - log_prod_qzi).mean()
    dwkl = (log_prod_qzi - log_pz).mean()
    loss = rec + cfg.alpha * mi + cfg.beta * tc + cfg.gamma * dwkl
    return loss, {"recon": rec.item(), "mi": mi.item(), "tc": tc.item(), "dwkl": dwkl.item()}


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N,H,W,C) uint8 -> (N,C,H,W) float in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def train_vae(images: np.ndarray, model_config: ConvVAEConfig | None = None, cfg: TrainConfig | None = None,
              progress: bool = True, log_every: int = 500) -> tuple[ConvVAE, list[dict[str, float]]]:
    """Train a :class:`ConvVAE` on uint8 images (N,H,W,C); deterministic for a given seed on CPU."""
    cfg = cfg or TrainConfig()
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (N,H,W,C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    model_config = model_config or ConvVAEConfig(image_size=h, channels=c)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = ConvVAE(model_config)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(images)
    history: list[dict[str, float]] = []
    from tqdm.auto import tqdm

    bar = tqdm(range(cfg.steps), desc="train-vae", disable=not progress)
    start = time.perf_counter()
    model.train()
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x = data[idx].permute(0, 3, 1, 2).float().div_(255.0)
        recon, mu, logvar, z = model(x)
        loss, parts = tcvae_loss(x, recon, mu, logvar, z, n, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            parts = {"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start} | parts
            history.append(parts)
            bar.set_postfix(loss=f"{parts['loss']:.1f}", tc=f"{parts['tc']:.2f}")
    model.eval()
    return model, history


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


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
