"""SAE quality, streamed over activations: reconstruction (FVU), sparsity (L0), dead and dense features.

Definitions (one row = one activation vector x of size d_in; N rows):

- FVU, fraction of variance unexplained: sum over rows and dims of (x - x_hat)^2, divided by the
  sum of (x - mean)^2 with the mean over all N rows (per dim). 0 is perfect; 1 is as good as
  predicting the mean. The same definition as sparsify's and SAELens' ``fvu``.
- L0: the mean number of features with activation > 0 per row.
- frequency of feature j: the fraction of rows on which j is active (> 0).
- dead: features never active on any row of the data (frequency 0).
- dense: features active on more than ``dense_threshold`` of the rows (default 0.1, i.e. 10 %;
  a feature that fires on every tenth vector says little about any one of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SAEMetricsError  # noqa: F401 (re-exported)
from .collect import ActivationStore

DENSE_THRESHOLD = 0.1


def iter_rows(source: Any, batch_size: int = 4096) -> Iterator[torch.Tensor]:
    """Yield (n, d_in) float32 row batches from a collection directory, an :class:`ActivationStore`,
    a (N, d_in) tensor, or an iterable of (n, d_in) tensors. Never loads a whole collection."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SAEMetricsError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(source, (str, Path)):
        source = ActivationStore(source)
    if isinstance(source, ActivationStore):
        for batch in source.iter_batches(batch_size):
            yield batch["activations"]
        return
    if torch.is_tensor(source):
        if source.ndim != 2:
            raise SAEMetricsError(f"activations must be a 2-D tensor (rows, d_in), got shape {tuple(source.shape)}")
        for start in range(0, len(source), batch_size):
            yield source[start:start + batch_size].float()
        return
    if isinstance(source, Iterable):
        for part in source:
            if not torch.is_tensor(part) or part.ndim != 2:
                raise SAEMetricsError(f"each activation batch must be a 2-D tensor (rows, d_in), got {getattr(part, 'shape', type(part).__name__)}")
            yield part.float()
        return
    raise SAEMetricsError(
        f"activations must be a collection directory, an ActivationStore, a (rows, d_in) tensor or an iterable of them, got {type(source).__name__}")


@dataclass
class SAEMetrics:
    """What :func:`sae_metrics` measured. ``frequency`` and ``max_activation`` have one value per feature."""

    fvu: float
    l0: float
    n_rows: int
    d_sae: int
    dead: list[int]
    dense: list[int]
    dense_threshold: float
    frequency: torch.Tensor
    max_activation: torch.Tensor

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (counts and index lists, not the per-feature tensors)."""
        return {"fvu": self.fvu, "l0": self.l0, "n_rows": self.n_rows, "d_sae": self.d_sae,
                "n_dead": len(self.dead), "n_dense": len(self.dense), "dense_threshold": self.dense_threshold,
                "dead": self.dead, "dense": self.dense}


@torch.no_grad()
def sae_metrics(sae: Any, activations: Any, *, batch_size: int = 4096, dense_threshold: float = DENSE_THRESHOLD) -> SAEMetrics:
    """FVU, L0, dead and dense features of ``sae`` over ``activations`` (see the module docstring).

    ``sae`` needs ``encode(x) -> f`` and ``decode(f) -> x_hat`` on (rows, d_in) tensors and a
    ``d_in`` attribute (e.g. :class:`~latentexplainer_plugin.sae.SparseAutoencoder`). One pass over
    the data, one batch in memory at a time; sums are kept in float64.
    """
    if not 0.0 < float(dense_threshold) < 1.0:
        raise SAEMetricsError(f"dense_threshold must be in (0, 1), a fraction of rows, got {dense_threshold!r}")
    d_in = int(sae.d_in)
    n = 0
    sse = 0.0
    sum_x = sum_x2 = None
    active = l0_sum = max_act = None
    for x in iter_rows(activations, batch_size):
        if x.shape[1] != d_in:
            raise SAEMetricsError(f"the SAE has d_in={d_in}, but the activations have {x.shape[1]} features per row")
        if not torch.isfinite(x).all():
            raise SAEMetricsError("the activations contain NaN or inf; collect them again from a model with finite outputs")
        f = sae.encode(x)
        x_hat = sae.decode(f)
        x64 = x.double()
        sse += float(((x64 - x_hat.double()) ** 2).sum())
        if sum_x is None:
            sum_x, sum_x2 = torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64)
            active = torch.zeros(f.shape[1], dtype=torch.int64)
            max_act = torch.zeros(f.shape[1])
            l0_sum = 0
        on = f > 0
        sum_x += x64.sum(0)
        sum_x2 += (x64 ** 2).sum(0)
        active += on.sum(0)
        l0_sum += int(on.sum())
        max_act = torch.maximum(max_act, f.max(0).values.float())
        n += len(x)
    if n == 0:
        raise SAEMetricsError("no activations to score (the source is empty)")
    total_var = float((sum_x2 - sum_x ** 2 / n).sum())
    frequency = active.double() / n
    return SAEMetrics(
        fvu=sse / total_var if total_var > 0 else float("nan"),
        l0=l0_sum / n, n_rows=n, d_sae=len(active),
        dead=torch.nonzero(active == 0).flatten().tolist(),
        dense=torch.nonzero(frequency > dense_threshold).flatten().tolist(),
        dense_threshold=float(dense_threshold), frequency=frequency.float(), max_activation=max_act,
    )
