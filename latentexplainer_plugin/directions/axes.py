"""Directions from the latent axes themselves (one-hot vectors), and user-supplied vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .base import Directions


def axes(dim: int, indices: Sequence[int] | None = None) -> Directions:
    """One-hot directions along latent axes ``indices`` (all ``dim`` axes by default)."""
    indices = list(range(dim)) if indices is None else list(indices)
    bad = [i for i in indices if not 0 <= i < dim]
    if bad:
        raise IndexError(f"axis indices {bad} out of range for a {dim}-dimensional latent (0..{dim - 1})")
    return Directions(torch.eye(dim)[indices], {"finder": "axes", "indices": indices})


def given(vectors: torch.Tensor | str | Path, normalize: bool = True) -> Directions:
    """Directions the user supplies: a tensor (K, *shape) / (*shape) or a safetensors file."""
    if isinstance(vectors, (str, Path)):
        found = Directions.load(vectors)
        vectors, provenance = found.vectors, found.provenance | {"finder": found.provenance.get("finder", "given")}
    else:
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        provenance = {"finder": "given"}
        if vectors.ndim == 1:
            vectors = vectors[None]
    d = Directions(vectors, provenance)
    if normalize:
        d.vectors = d.vectors / d.vectors.flatten(1).norm(dim=1).view(-1, *([1] * (d.vectors.ndim - 1)))
    return d
