"""Directions in a latent space, with the provenance needed to reproduce them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hooks import check_finite


@dataclass
class Directions:
    """``vectors`` (K, *site_shape), one direction per row, plus where they came from."""

    vectors: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.ndim < 2 or len(self.vectors) == 0:
            raise ValueError(f"directions must be (K, *shape) with K >= 1, got shape {tuple(self.vectors.shape)}")
        check_finite(self.vectors, "directions")
        norms = self.vectors.flatten(1).norm(dim=1)
        zero = torch.nonzero(norms < 1e-8).flatten().tolist()
        if zero:
            raise ValueError(f"direction(s) {zero} have zero norm; a direction must move the latent somewhere")

    def __len__(self) -> int:
        return len(self.vectors)

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file; provenance goes into its metadata as JSON."""
        from safetensors.torch import save

        from ..safe_io import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({"directions": self.vectors.detach().contiguous().cpu()},
                    metadata={"provenance": json.dumps(self.provenance, sort_keys=True, default=str)})
        atomic_write_bytes(path, data)  # no link followed, never a half-written file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        from safetensors import safe_open

        from ..safe_load import LoadError, load_safetensors

        tensors = load_safetensors(path)
        if "directions" not in tensors:
            raise LoadError(f"{path} has no 'directions' tensor (found: {', '.join(tensors) or 'none'})")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        provenance = json.loads(meta.get("provenance", "{}")) | {"file": str(path)}
        return cls(tensors["directions"].float(), provenance)
