"""Train a beta-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs").

The ELBO's KL term is split into index-code mutual information, total correlation (TC) and
dimension-wise KL; TC is weighted by ``beta``. log q(z) and prod_j log q(z_j) are estimated
with minibatch-weighted sampling (their eq. (S5)).

Two recipes share this trainer:

* ``TrainConfig()`` field defaults: the original recipe (``kl="sampled"``: all three KL terms
  from the minibatch estimates, fixed weights from step 0). The shipped demo weights and
  ``train-demo`` use it, bit for bit.
* :func:`default_train_config`: what ``latentexplainer train-vae`` uses. It adds the standard
  remedies against posterior collapse (a model that ignores most latents): a closed-form KL per
  latent plus ``(beta - 1) * TC`` (the same objective in expectation, less noise), a linear KL
  warm-up, free bits that fade out, a TC weight scaled to the image size and latent count, and a
  collapse check. Capacity annealing is available as an option.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .conv_vae import ConvVAE, ConvVAEConfig, images_to_tensor
from .statistics import encode_means, latent_kl  # noqa: F401 (re-exported)

KL_ESTIMATORS = ("sampled", "analytic")

# train-vae defaults; each is explained (with its source) in default_train_config's docstring.
DEFAULT_STEPS = 6000
DEFAULT_BATCH_SIZE = 64
DEFAULT_BETA_NORM = 0.005
DEFAULT_WARMUP_FRACTION = 0.25
DEFAULT_FREE_BITS = 1.0
DEFAULT_FREE_BITS_FRACTION = 0.8


@dataclass
class TrainConfig:
    """Optimisation and objective settings. Field defaults are the original (demo) recipe.

    ``warmup_steps``: the weight of every KL/TC term rises linearly from 0 to 1 over these steps
    (KL annealing, Bowman et al. 2016; "warm-up", Sønderby et al. 2016); 0: off.
    ``free_bits``: nats per latent below which its KL costs nothing, ``sum_j max(lambda, KL_j)``
    with ``KL_j`` the batch mean (Kingma et al. 2016, eq. 13); needs ``kl="analytic"``; 0: off.
    ``free_bits_steps``: fade the free bits out: lambda is held for the first half of these steps,
    then falls linearly to 0 at ``free_bits_steps`` (:func:`free_bits_at`); 0: held throughout.
    ``capacity``: C_max in nats; the KL term becomes ``capacity_weight * |KL - C(t)|`` with C(t)
    rising linearly from 0 to C_max over ``capacity_steps`` (Burgess et al. 2018, eq. 8);
    needs ``kl="analytic"``; 0: off.
    ``recon_scale``: multiplies the Bernoulli log-likelihood (a likelihood temperature; > 1
    weighs reconstruction more, which counters collapse; equivalent to dividing every KL weight).
    ``kl``: "sampled" (Chen et al.'s minibatch estimates of MI, TC and dimension-wise KL) or
    "analytic" (closed-form KL per latent + (alpha-1) MI + (beta-1) TC + (gamma-1) dwKL).
    ``threads``: torch threads; 0 picks them from the free cores (:func:`choose_threads`).
    ``stop_on_collapse``: end training early when the collapse check fails after the warm-up.
    """

    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 6.0  # weight of the total-correlation term
    alpha: float = 1.0  # weight of the mutual-information term
    gamma: float = 1.0  # weight of the dimension-wise KL term
    seed: int = 0
    threads: int = 2
    kl: str = "sampled"
    warmup_steps: int = 0
    free_bits: float = 0.0
    free_bits_steps: int = 0
    capacity: float = 0.0
    capacity_steps: int = 0
    capacity_weight: float = 100.0
    recon_scale: float = 1.0
    stop_on_collapse: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2, got {self.batch_size}")
        if self.kl not in KL_ESTIMATORS:
            problems.append(f"kl must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl!r}")
        for name in ("lr", "recon_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("beta", "alpha", "gamma", "free_bits", "capacity", "capacity_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                problems.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "capacity_steps", "free_bits_steps", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.free_bits > 0 or self.capacity > 0) and self.kl != "analytic":
            problems.append("free_bits and capacity need kl='analytic' (a per-latent KL)")
        if problems:
            raise ValueError("; ".join(problems))


def beta_from_normalized(beta_norm: float, image_size: int, channels: int, latent_dim: int) -> float:
    """TC weight from a normalised beta: ``beta = beta_norm * N / M`` (Higgins et al. 2017).

    N = image_size**2 * channels input values (the summed reconstruction term grows with N),
    M = latent_dim. Never below 1: beta < 1 would reward total correlation.
    """
    if not (math.isfinite(beta_norm) and beta_norm >= 0):
        raise ValueError(f"beta_norm must be a finite number >= 0, got {beta_norm}")
    return max(1.0, beta_norm * image_size * image_size * channels / latent_dim)


def default_train_config(image_size: int, channels: int, latent_dim: int, **overrides: Any) -> TrainConfig:
    """The ``train-vae`` recipe for images of this size; ``overrides`` replace any field.

    * ``kl="analytic"``: closed-form KL per latent + ``(beta - 1) * TC`` from minibatch-weighted
      sampling: the beta-TCVAE objective with alpha = gamma = 1 (Chen et al. 2018, eq. 4) with
      less gradient noise, and a per-latent KL that the collapse check can read.
    * ``warmup_steps = steps / 4``: KL warm-up from 0 (Bowman et al. 2016; Sønderby et al. 2016).
      The encoder learns to use its latents before the KL cost can switch them off, which is how
      small objects get lost.
    * ``beta = 0.005 * H * W * C / latent_dim`` (normalised beta, Higgins et al. 2017): 6.1 for
      64x64 RGB and 10 latents (the demo's beta 6), smaller for smaller images, at least 1.
    * ``batch_size = 64``, ``steps = 6000``: 384k images seen, about 9 minutes on an idle core
      (far longer on a shared one, docs/training.md); smaller batches give more updates for the
      same compute. 2000 steps captured 3 factors on held-out shapes2 and shapes3 images, 6000
      capture 4 on both (background, x, y, scale).
    * ``free_bits = 1.0`` nats per latent (Kingma et al. 2016), faded out (``free_bits_steps =
      0.8 * steps``: held for the first 40 % of the steps, 0 from 80 %). Warm-up alone was not
      enough on shapes2: 4 latents were active when the KL weight reached 1, 1 was left 500 steps
      later; the decoder had not yet learnt to use them. Free bits keep them alive until it has;
      fading them out lets unused latents collapse for real by the end, so the activity report
      (KL > 0.05 nats) stays honest. Capacity annealing (Burgess et al. 2018) stays off.
    * ``threads=0``: chosen from the free cores (:func:`choose_threads`).
    """
    steps = int(overrides.get("steps", DEFAULT_STEPS))
    base = TrainConfig(
        steps=steps,
        batch_size=DEFAULT_BATCH_SIZE,
        beta=beta_from_normalized(DEFAULT_BETA_NORM, image_size, channels, latent_dim),
        kl="analytic",
        warmup_steps=int(round(steps * DEFAULT_WARMUP_FRACTION)),
        free_bits=DEFAULT_FREE_BITS,
        free_bits_steps=int(round(steps * DEFAULT_FREE_BITS_FRACTION)),
        threads=0,
    )
    return replace(base, **overrides)


def choose_threads(requested: int = 0) -> int:
    """Torch threads to train with: ``requested`` if > 0, else the cores not already busy.

    Measured on a 2-core machine (docs/training.md): 2 threads are fastest when the cores are
    idle, but when another process keeps a core busy torch's second worker waits on it and
    1 thread is about 2x faster than 2. So: usable cores minus the 1-minute load average, >= 1.
    """
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def kl_weight(step: int, warmup_steps: int) -> float:
    """Weight of the KL/TC terms at ``step`` (0-based): ``min(1, step / warmup_steps)``; 1 without warm-up."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def capacity_at(step: int, capacity: float, capacity_steps: int) -> float:
    """Target KL C(t) of capacity annealing: rises linearly from 0 to ``capacity`` over ``capacity_steps``."""
    if capacity_steps <= 0:
        return float(capacity)
    return float(capacity) * min(1.0, step / capacity_steps)


def free_bits_at(step: int, free_bits: float, free_bits_steps: int) -> float:
    """Free bits at ``step``: ``free_bits`` up to ``free_bits_steps / 2``, then linearly to 0 at ``free_bits_steps``."""
    if free_bits_steps <= 0:
        return float(free_bits)
    half = free_bits_steps / 2
    return float(free_bits) * min(1.0, max(0.0, (free_bits_steps - step) / half))


def free_bits_kl(kl_per_latent: torch.Tensor, free_bits: float) -> torch.Tensor:
    """``sum_j max(free_bits, KL_j)`` (Kingma et al. 2016): no pressure on a latent below ``free_bits`` nats."""
    if free_bits <= 0:
        return kl_per_latent.sum()
    return torch.clamp(kl_per_latent, min=free_bits).sum()


def _gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 * torch.exp(-logvar))


def _kl_per_latent(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(q(z_d|x) || N(0,1)) for each latent d, shape (D,)."""
    return (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).mean(0)


def tcvae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor,
               dataset_size: int, cfg: TrainConfig, step: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """beta-TCVAE loss for one batch and its parts; ``step`` drives warm-up and capacity (None: fully on)."""
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
    w = 1.0 if step is None else kl_weight(step, cfg.warmup_steps)
    parts = {"recon": rec.item(), "mi": mi.item(), "tc": tc.item(), "dwkl": dwkl.item()}
    if cfg.kl == "sampled":
        if w == 1.0 and cfg.recon_scale == 1.0:  # the original expression, so the demo recipe stays bit for bit
            loss = rec + cfg.alpha * mi + cfg.beta * tc + cfg.gamma * dwkl
        else:
            loss = cfg.recon_scale * rec + w * (cfg.alpha * mi + cfg.beta * tc + cfg.gamma * dwkl)
        return loss, parts | {"kl_weight": w}
    kl_d = _kl_per_latent(mu, logvar)
    kl_total = kl_d.sum()
    if cfg.capacity > 0:
        c = capacity_at(step if step is not None else cfg.capacity_steps, cfg.capacity, cfg.capacity_steps)
        kl_term = cfg.capacity_weight * (kl_total - c).abs()
        parts["capacity"] = c
    else:
        lam = free_bits_at(step if step is not None else cfg.free_bits_steps, cfg.free_bits, cfg.free_bits_steps)
        kl_term = free_bits_kl(kl_d, lam)
        parts["free_bits"] = lam
    # KL = MI + TC + dwKL in expectation, so this is alpha*MI + beta*TC + gamma*dwKL with the KL in closed form.
    extra = (cfg.alpha - 1.0) * mi + (cfg.beta - 1.0) * tc + (cfg.gamma - 1.0) * dwkl
    loss = cfg.recon_scale * rec + w * (kl_term + extra)
    return loss, parts | {"kl": kl_total.item(), "kl_weight": w}


def active_count_needed(latent_dim: int) -> int:
    """Fewest active latents that do not count as collapse: 3, or half the latents when there are fewer than 6."""
    return min(3, math.ceil(latent_dim / 2))


def collapse_advice() -> str:
    """What to try after a collapsed run, in :class:`TrainConfig` fields (``beta_norm``: see
    :func:`beta_from_normalized`); the command line prints the train-vae flags instead."""
    return ("try more steps=, a longer warmup_steps=, a smaller beta_norm= (or beta=), recon_scale=2 (weighs reconstruction "
            "more), more free_bits= or a later free_bits_steps= (Kingma et al. 2016), or capacity=25 (Burgess et al. 2018)")


def train_vae(images: np.ndarray, model_config: ConvVAEConfig | None = None, cfg: TrainConfig | None = None,
              progress: bool = True, log_every: int = 500) -> tuple[ConvVAE, list[dict[str, float]]]:
    """Train a :class:`ConvVAE` on uint8 images (N,H,W,C); deterministic for a given seed and thread count on CPU.

    Training sets torch's thread count (``cfg.threads``) and restores the caller's afterwards.

    Without ``cfg``: :func:`default_train_config` for these images. Each history entry holds the
    loss parts at a logged step, ``active`` (latents whose running-mean batch KL exceeds 0.05
    nats) and ``seconds``; the last entry also has ``stopped_early`` and ``threads``.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (N,H,W,C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    model_config = model_config or ConvVAEConfig(image_size=h, channels=c)
    cfg = cfg or default_train_config(h, c, model_config.latent_dim)
    torch.manual_seed(cfg.seed)
    threads = choose_threads(cfg.threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(images, model_config, cfg, threads, progress, log_every)
    finally:  # a process-wide setting: never leave it changed (later work would run on other threads)
        torch.set_num_threads(previous_threads)


def _train(images: np.ndarray, model_config: ConvVAEConfig, cfg: TrainConfig, threads: int, progress: bool,
           log_every: int) -> tuple[ConvVAE, list[dict[str, float]]]:
    n = images.shape[0]
    model = ConvVAE(model_config)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps, eta_min=cfg.lr * 0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.from_numpy(images)
    history: list[dict[str, float]] = []
    from tqdm.auto import tqdm

    from .statistics import KL_ACTIVE

    bar = tqdm(range(cfg.steps), desc="train-vae", disable=not progress)
    start = time.perf_counter()
    ema = torch.zeros(model_config.latent_dim)  # running mean of the batch KL per latent (collapse signal)
    check_at = max(cfg.warmup_steps, cfg.capacity_steps if cfg.capacity > 0 else 0,
                   cfg.free_bits_steps if cfg.free_bits > 0 else 0) + max(1, cfg.steps // 10)
    stopped_early = False
    model.train()
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x = data[idx].permute(0, 3, 1, 2).float().div_(255.0)
        recon, mu, logvar, z = model(x)
        loss, parts = tcvae_loss(x, recon, mu, logvar, z, n, cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            ema.mul_(0.98).add_(_kl_per_latent(mu.detach(), logvar.detach()), alpha=0.02)
        active = int((ema / (1.0 - 0.98 ** (step + 1)) > KL_ACTIVE).sum())  # bias-corrected like Adam's moments
        last = step == cfg.steps - 1
        if step == check_at and active < active_count_needed(model_config.latent_dim):
            msg = (f"collapse: only {active} of {model_config.latent_dim} latents carry information at step {step} "
                   f"(after the warm-up); {collapse_advice()}")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if cfg.stop_on_collapse:
                stopped_early = last = True
        if step % log_every == 0 or last:
            entry = {"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start, "active": active} | parts
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.1f}", tc=f"{entry['tc']:.2f}", active=active)
        if stopped_early:
            break
    history[-1] |= {"stopped_early": stopped_early, "threads": threads}
    model.eval()
    return model, history


def latent_report(model: ConvVAE, images: np.ndarray, factors: np.ndarray | None = None,
                  factor_names: Sequence[str] | None = None, max_images: int = 2000, seed: int = 0) -> dict[str, Any]:
    """KL per latent, active latents (KL > 0.05 nats), the factor each captures (NMI) and a collapse warning.

    Measured on a seeded subsample of at most ``max_images`` images. ``warning`` is None unless
    fewer than :func:`active_count_needed` latents are active.
    """
    from .statistics import KL_ACTIVE, latent_stats

    if len(images) > max_images:
        pick = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
        images = images[pick]
        factors = factors[pick] if factors is not None else None
    stats = latent_stats(model, images, factors, factor_names)
    kl = [round(float(v), 4) for v in stats.kl]
    active = [i for i, v in enumerate(stats.kl) if v > KL_ACTIVE]
    report: dict[str, Any] = {"kl_per_latent": kl, "active_latents": active, "n_active": len(active),
                              "kl_active_threshold": KL_ACTIVE, "n_images": int(len(images))}
    if stats.factors is not None:
        report["captured"] = [{"latent": m.latent, "factor": m.factor, "nmi": round(m.score, 4)} for m in stats.factors]
        report["captured_factors"] = sorted({m.factor for m in stats.factors if m.factor})
    need = active_count_needed(model.latent_dim)
    report["collapsed"] = len(active) < need
    report["warning"] = (
        f"POSTERIOR COLLAPSE: only {len(active)} of {model.latent_dim} latents are active (KL > {KL_ACTIVE} nats; "
        f"at least {need} expected); the model ignores most of what varies in the data. {collapse_advice()}."
        if report["collapsed"] else None
    )
    return report


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
