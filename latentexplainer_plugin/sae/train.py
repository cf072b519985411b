"""Train a TopK sparse autoencoder on collected activations, with EleutherAI's ``sparsify`` library.

``sparsify`` (PyPI ``eai-sparsify``) provides the model and the loss: ``SparseCoder`` (ReLU encoder,
top-k selection, unit-norm decoder, AuxK loss for dead latents; Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"). Its own ``Trainer`` needs a Hugging Face model and a token
dataset, so the short loop below feeds it rows from a collection instead:

1. b_dec := mean of the first rows (sparsify's trainer does the same).
2. Per step: loss = FVU + auxk_alpha * AuxK, where AuxK lets the top dead latents (inactive for
   ``dead_after_rows`` rows) predict the residual (Gao et al. 2024, appendix B.1).
3. Remove the gradient component parallel to each decoder row, Adam step, renormalise the
   decoder rows to unit norm (sparsify's own methods).

The result is a :class:`~latentexplainer_plugin.sae.SparseAutoencoder` (architecture ``topk``),
written in SAELens layout when ``out_dir`` is given. Why sparsify: docs/sae-training.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import SAETrainError  # noqa: F401 (re-exported)
from .collect import ActivationStore
from .formats import save_sae
from .metrics import SAEMetrics, iter_rows, sae_metrics
from .model import SparseAutoencoder

LIBRARY = "sparsify"
REQUIREMENT = "eai-sparsify>=1.3.3"


@dataclass
class SAETrainReport:
    """How training went: settings, time, and the metrics of the trained SAE on the training data."""

    library: str
    d_in: int
    d_sae: int
    k: int
    steps: int
    batch_size: int
    lr: float
    auxk_alpha: float
    seed: int
    rows_seen: int
    seconds: float
    loss_curve: list[float] = field(default_factory=list)  # mean FVU over each tenth of training
    metrics: dict[str, Any] = field(default_factory=dict)  # SAEMetrics.as_dict() on the training data

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _import_sparsify():
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as exc:
        raise SAETrainError(
            f"training an SAE needs the sparsify library ({exc}); install it with: pip install '{REQUIREMENT}'") from exc
    return SparseCoder, SparseCoderConfig


def _source_info(source: Any) -> tuple[int, int, Any]:
    """(rows, d_in, normalised source) without reading the data."""
    if isinstance(source, (str, Path)):
        source = ActivationStore(source)
    if isinstance(source, ActivationStore):
        return len(source), source.d_in, source
    if torch.is_tensor(source):
        if source.ndim != 2 or not source.is_floating_point():
            raise SAETrainError(f"activations must be a 2-D float tensor (rows, d_in), got {source.dtype} of shape {tuple(source.shape)}")
        return source.shape[0], source.shape[1], source
    raise SAETrainError(f"activations must be a collection directory, an ActivationStore or a (rows, d_in) tensor, got {type(source).__name__}")


def shuffled_batches(source: Any, batch_size: int, seed: int = 0, buffer_rows: int = 262144) -> Iterator[torch.Tensor]:
    """Endless shuffled row batches. Tensors: random permutations. Collections: shards in random order
    through a mixing buffer of at most ``buffer_rows`` rows, so memory stays bounded."""
    g = torch.Generator().manual_seed(seed)
    if torch.is_tensor(source):
        while True:
            perm = torch.randperm(len(source), generator=g)
            for start in range(0, len(perm) - batch_size + 1, batch_size):
                yield source[perm[start:start + batch_size]].float()
            if len(perm) < batch_size:
                yield source[perm].float()
    store: ActivationStore = source
    buffer_rows = max(buffer_rows, 2 * batch_size)
    buffer = torch.empty(0, store.d_in)
    while True:
        order = torch.randperm(len(store.manifest.shards), generator=g).tolist()
        for i in order:
            shard = store.manifest.shards[i]
            with safe_open(str(store.directory / shard["file"]), framework="pt") as f:
                rows = f.get_tensor("activations").float()
            buffer = torch.cat([buffer, rows])
            if len(buffer) >= buffer_rows:
                buffer = buffer[torch.randperm(len(buffer), generator=g)]
                half = len(buffer) // 2
                for start in range(0, half - batch_size + 1, batch_size):
                    yield buffer[start:start + batch_size]
                buffer = buffer[(half // batch_size) * batch_size:]
        if len(buffer):
            buffer = buffer[torch.randperm(len(buffer), generator=g)]
            for start in range(0, len(buffer) - batch_size + 1, batch_size):
                yield buffer[start:start + batch_size]
            buffer = buffer[(len(buffer) // batch_size) * batch_size:]


def train_sae(
    activations: Any,
    d_sae: int,
    k: int,
    steps: int,
    *,
    batch_size: int = 4096,
    lr: float | None = None,
    auxk_alpha: float = 1 / 32,
    dead_after_rows: int | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    site: str | None = None,
    evaluate: bool = True,
) -> tuple[SparseAutoencoder, SAETrainReport]:
    """Train a TopK SAE with ``d_sae`` features, ``k`` active per row, for ``steps`` Adam steps.

    ``activations``: a collection directory (:func:`~latentexplainer_plugin.sae.collect.collect_activations`),
    an :class:`ActivationStore` or a (rows, d_in) tensor. ``lr`` defaults to sparsify's rule
    2e-4 / sqrt(d_sae / 2^14). A latent counts as dead for the AuxK loss after ``dead_after_rows``
    rows without firing (default: ten batches). With ``out_dir`` the SAE is written there in SAELens
    layout (``cfg.json`` + ``sae_weights.safetensors``) with ``site`` as its hook name. With
    ``evaluate`` the report holds :func:`~latentexplainer_plugin.sae.metrics.sae_metrics` on the
    training data (one more streamed pass).
    """
    n_rows, d_in, source = _source_info(activations)
    for name, value in (("d_sae", d_sae), ("k", k), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SAETrainError(f"{name} must be an int >= 1, got {value!r}")
    if k > d_sae:
        raise SAETrainError(f"k ({k}) must be at most d_sae ({d_sae}): a TopK SAE keeps k of its d_sae features active")
    if n_rows < 1:
        raise SAETrainError("the activations hold no rows; collect some first")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise SAETrainError(f"lr must be a positive number, got {lr!r}")
    if not (math.isfinite(auxk_alpha) and auxk_alpha >= 0):
        raise SAETrainError(f"auxk_alpha must be >= 0, got {auxk_alpha!r}")
    batch_size = min(batch_size, n_rows)
    dead_after = dead_after_rows if dead_after_rows is not None else 10 * batch_size
    lr = float(lr) if lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)
    SparseCoder, SparseCoderConfig = _import_sparsify()

    torch.manual_seed(seed)
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k))
    batches = shuffled_batches(source, batch_size, seed=seed)
    first = next(batches)
    if not torch.isfinite(first).all():
        raise SAETrainError("the activations contain NaN or inf; collect them again from a model with finite outputs")
    with torch.no_grad():
        coder.b_dec.data = first.mean(0)  # 1.
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    fvus: list[float] = []
    start = time.perf_counter()
    x = first
    for step in range(steps):
        if step:
            x = next(batches)
        out = coder(x, dead_mask=since_fired > dead_after if auxk_alpha > 0 else None)  # 2.
        loss = out.fvu + auxk_alpha * out.auxk_loss
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()  # 3.
        opt.step()
        opt.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[out.latent_indices[out.latent_acts > 0].flatten()] = True
        since_fired += len(x)
        since_fired[fired] = 0
        fvus.append(float(out.fvu.detach()))
        if not math.isfinite(fvus[-1]):
            raise SAETrainError(f"training diverged at step {step} (FVU {fvus[-1]}); lower lr (now {lr:g})")
    seconds = time.perf_counter() - start

    sae = SparseAutoencoder(
        coder.encoder.weight.detach().T.contiguous(), coder.encoder.bias.detach().clone(),
        coder.W_dec.detach().clone(), coder.b_dec.detach().clone(), "topk", k=k,
        apply_b_dec_to_input=True, site=site, meta={"trained_with": f"{LIBRARY} (SparseCoder)"},
    )
    tenth = max(1, steps // 10)
    report = SAETrainReport(
        library=LIBRARY, d_in=d_in, d_sae=d_sae, k=k, steps=steps, batch_size=batch_size, lr=lr,
        auxk_alpha=auxk_alpha, seed=seed, rows_seen=steps * batch_size, seconds=round(seconds, 3),
        loss_curve=[round(sum(fvus[i:i + tenth]) / len(fvus[i:i + tenth]), 6) for i in range(0, steps, tenth)],
    )
    if evaluate:
        report.metrics = sae_metrics(sae, source).as_dict()
    if out_dir is not None:
        save_sae(sae, out_dir)
    return sae, report


def evaluate_sae(sae: SparseAutoencoder, activations: Any, **kwargs: Any) -> SAEMetrics:
    """:func:`~latentexplainer_plugin.sae.metrics.sae_metrics` (kept here so training code imports one module)."""
    return sae_metrics(sae, activations, **kwargs)


__all__ = ["LIBRARY", "REQUIREMENT", "SAETrainError", "SAETrainReport", "evaluate_sae", "iter_rows", "shuffled_batches", "train_sae"]
