"""What every adapter (a model family's recipe from latents to images) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

import torch

from ..options import ComponentOptions
from ..types import Traversal

DEFAULT_STRENGTHS = (-3.0, -1.5, 0.0, 1.5, 3.0)  # the LatentExplainer paper's traversal values


def check_strengths(strengths: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Strengths as a 1-D float tensor; empty, NaN or inf values raise ValueError."""
    try:
        t = torch.as_tensor(strengths, dtype=torch.float32).flatten()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"strengths must be a list of numbers, got {strengths!r}") from exc
    if t.numel() < 2:
        raise ValueError(f"strengths must hold at least 2 values to show a change, got {t.tolist()}")
    if not torch.isfinite(t).all():
        raise ValueError(f"strengths must be finite numbers, got {t.tolist()}")
    return t


class Adapter(ABC):
    """Turns (site, latent or direction, strengths) into a :class:`Traversal` of images."""

    name: ClassVar[str] = "adapter"
    default_bias: ClassVar[str] = "disentanglement"  # the bias used when the caller names none
    #: The most comparison rows a traversal can have (h-space directions have no other latent to clamp: 1).
    max_rows: ClassVar[int] = 1_000_000
    #: Keyword options of the constructor that the command line may set (``-o KEY=VALUE``, friendly flags).
    Options: ClassVar[type[ComponentOptions]] = ComponentOptions
    #: What it explains: ``latent_axes`` and/or ``directions`` (then a direction finder supplies them),
    #: ``sampling_loop`` (edits every step), ``inversion`` (can map images back to its latents).
    capabilities: ClassVar[frozenset[str]] = frozenset({"latent_axes"})
    #: The direction finder used when the caller names none (adapters with directions but no latent axes).
    default_direction_finder: ClassVar[str | None] = None

    @property
    @abstractmethod
    def n_latents(self) -> int:
        """How many latents (or directions) can be explained."""

    @abstractmethod
    def latent_id(self, index: int) -> str:
        """Human-readable id of latent ``index`` (``z3``, ``dir0``)."""

    @abstractmethod
    def sample_bases(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` base latents to traverse from, reproducible from ``seed``."""

    @abstractmethod
    def traverse(self, indices: Sequence[int], bases: torch.Tensor, strengths: torch.Tensor,
                 rows: int = 1, **options: Any) -> list[Traversal]:
        """One Traversal per index, all decoded in batched calls; ``rows`` > 1 adds comparison rows."""

    def check_index(self, index: int) -> int:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.n_latents:
            raise IndexError(
                f"latent index {index!r} is out of range: this model has {self.n_latents} latents (0..{self.n_latents - 1})"
            )
        return index

    # Optional, for ranking latents with captum (ranking.LatentScore); adapters that support it
    # implement both:
    #   latent_coordinates(bases, alpha=1.0) -> (inputs (B, K), additional_forward_args or None, baselines)
    #   images_at(inputs, *extra) -> images (B, C, H, W) in [0, 1], differentiable in ``inputs``
    # ``alpha`` is the point along each direction for adapters that explain directions.

    # Optional, for steering SAE features (sae.SAEFeatureAdapter); adapters that declare the
    # ``site_edits`` capability implement both (references: VAEAdapter, DDPMAdapter):
    #   render_edited(bases, edit, site=None) -> images (B, C, H, W) in [0, 1], ``edit`` (any
    #       registered rule, one strength per base) applied at ``site`` wherever the adapter edits
    #       (a decoder: its one call; a sampling loop: every step of the edit window)
    #   site_activations(bases, site=None) -> (B, calls, *item shape): the activation at ``site``
    #       on those same calls
    #   output_to_images(output) -> images (B, C, H, W) in [0, 1]: the driver's output as images
    #       (sampled examples render and collect in one pass with it)
    # They also carry ``driver`` (the module whose forward renders bases), ``site`` and ``max_batch``.

    def latent_statistics(self, data: dict[str, Any]) -> Any:
        """Per-latent statistics from a dataset (npz layout: images, optional factors), e.g. KL and the
        factor each latent captures; None when this adapter cannot compute any (no encoder)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_latents": self.n_latents}
