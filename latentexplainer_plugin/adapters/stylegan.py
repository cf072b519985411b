"""Generators with a mapping / synthesis split (StyleGAN layout): explain W, or W+ restricted to some layers.

A StyleGAN-like module has ``mapping(z) -> w`` ((B, w_dim), or (B, num_ws, w_dim) already broadcast)
and ``synthesis(ws) -> images`` with ``ws`` (B, num_ws, w_dim). W is the space of one w shared by
every layer; W+ gives each synthesis layer its own copy (Abdal et al. 2019), so an edit can reach
only some layers (coarse layers: pose, shape; fine layers: colour, texture; Karras et al. 2019).

1. Bases are w = mapping(z) for z ~ N(0, I): edits start from points the generator actually uses.
2. The latents are directions in W: by default its axes, or what a finder gives (SeFa factorises the
   first synthesis layer that reads w, GANSpace runs PCA on W samples; Shen & Zhou 2021,
   Haerkoenen et al. 2020). The site is the synthesis input (the driver's own input).
3. Strengths are in standard deviations of w along each direction (over ``stats_samples`` mapped
   samples), since W's coordinates have no common scale: w <- w + s * std(<w, v>) * v.
4. W+ (``space="w+"``, ``layers=``): the same step is added only to the copies of the listed
   layers; the other layers keep the base w.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from pydantic import Field
from torch import nn

from ..options import ComponentOptions, PositiveInt
from ..types import Site, Traversal
from .base import check_strengths
from .generator import discover_latent_shape, load_generator
from .vae import VAEAdapter


class _SynthesisDriver(nn.Module):
    """``forward(w)``: (B, w_dim) broadcast to every layer (W), or (B, num_ws * w_dim) one per layer (W+)."""

    def __init__(self, synthesis: nn.Module, num_ws: int | None, w_dim: int, per_layer: bool):
        super().__init__()
        self.synthesis = synthesis
        self.num_ws, self.w_dim, self.per_layer = num_ws, w_dim, per_layer

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.per_layer:
            ws = w.view(len(w), self.num_ws, self.w_dim)
        elif self.num_ws is not None:
            ws = w[:, None, :].expand(len(w), self.num_ws, self.w_dim)
        else:
            ws = w  # a synthesis network that takes one w per image
        out = self.synthesis(ws)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not torch.is_tensor(out) or out.ndim != 4:
            raise TypeError(f"synthesis must return images (B, C, H, W), got {getattr(out, 'shape', type(out).__name__)}")
        return out


def parse_layers(layers: str | Sequence[int] | None, num_ws: int) -> list[int]:
    """``"0-3"``, ``"0,2,5"`` or a list -> sorted layer numbers in [0, num_ws); None -> every layer."""
    if layers is None:
        return list(range(num_ws))
    if isinstance(layers, str):
        found: list[int] = []
        for part in (p.strip() for p in layers.split(",") if p.strip()):
            lo, sep, hi = part.partition("-")
            try:
                found += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
            except ValueError:
                raise ValueError(f"layers must be numbers or ranges such as 0-3,6, got {layers!r}") from None
        layers = found
    chosen = sorted({int(v) for v in layers})
    bad = [v for v in chosen if not 0 <= v < num_ws]
    if not chosen or bad:
        raise ValueError(f"layers must be synthesis layers in 0..{num_ws - 1}, got {bad or 'none'}")
    return chosen


class StyleGANAdapter(VAEAdapter):
    """Explain directions in W (or W+ at chosen layers) of a generator with ``mapping`` and ``synthesis``.

    Args:
        model: the generator module (or ``file.py:factory``); it needs ``mapping`` and ``synthesis`` submodules.
        space: ``"w"`` (one w for every layer) or ``"w+"`` (the edit reaches only ``layers``).
        layers: W+ layers to edit, e.g. ``"0-3"`` or ``[4, 5]`` (default: all).
        num_ws: number of synthesis layers, when neither mapping's output nor ``synthesis.num_ws`` tells.
        stats_samples: mapped samples whose spread sets the strength unit of each direction.
    """

    name = "stylegan"
    default_bias = "combination"  # a direction has no other latent to clamp in a second row
    max_rows = 1
    capabilities = frozenset({"latent_axes", "directions", "site_edits"})

    class Options(ComponentOptions):
        """Options of the ``stylegan`` adapter."""

        space: Literal["w", "w+"] = Field("w", description="w: one w for every synthesis layer; w+: edit only --layers")
        layers: Optional[str] = Field(None, description="W+ layers to edit, e.g. 0-3 or 4,5 (default: all)")
        num_ws: Optional[PositiveInt] = Field(None, description="synthesis layers, when the model does not tell")
        stats_samples: PositiveInt = Field(1000, description="mapped samples that set each direction's strength unit")
        max_batch: PositiveInt = Field(512, description="images generated together")
        device: str = Field("cpu", description="torch device (the run's --device)")

    def __init__(self, model: nn.Module | str | Path, space: str = "w", layers: str | Sequence[int] | None = None,
                 num_ws: int | None = None, stats_samples: int = 1000, max_batch: int = 512, device: str = "cpu"):
        if isinstance(model, (str, Path)):
            model = load_generator(str(model))
        mapping, synthesis = getattr(model, "mapping", None), getattr(model, "synthesis", None)
        if not (isinstance(mapping, nn.Module) and isinstance(synthesis, nn.Module)):
            children = ", ".join(n for n, _ in model.named_children()) or "none"
            raise ValueError(f"{type(model).__name__} has no mapping and synthesis submodules (StyleGAN layout), so it "
                             f"has no W space; its children: {children}. Use the generator adapter for z")
        if space not in ("w", "w+"):
            raise ValueError(f"space must be 'w' or 'w+', got {space!r}")
        if stats_samples < 2 or max_batch < 1:
            raise ValueError(f"stats_samples must be >= 2 and max_batch >= 1, got {stats_samples} and {max_batch}")
        self.model, self.mapping, self.space = model.eval(), mapping.eval(), space
        self.device = torch.device(device)
        found = discover_latent_shape(model) or discover_latent_shape(mapping)
        if found is None:
            raise ValueError(f"cannot tell the z size of {type(model).__name__}: give it a z_dim attribute")
        self.z_dim = int(torch.tensor(found).prod())
        with torch.no_grad():
            probe = self.mapping(torch.zeros(1, self.z_dim, device=self.device))
        if probe.ndim == 3:  # mapping already broadcasts: (B, num_ws, w_dim)
            num_ws, w_dim = num_ws or probe.shape[1], probe.shape[2]
        elif probe.ndim == 2:
            w_dim = probe.shape[1]
            num_ws = num_ws or getattr(synthesis, "num_ws", None) or getattr(model, "num_ws", None)
        else:
            raise ValueError(f"mapping must return w of shape (B, w_dim) or (B, num_ws, w_dim), got {tuple(probe.shape)}")
        if space == "w+" and num_ws is None:
            raise ValueError("space='w+' needs the number of synthesis layers: give the synthesis module a num_ws "
                             "attribute or pass num_ws=")
        self.w_dim, self.num_ws = int(w_dim), (int(num_ws) if num_ws is not None else None)
        self.layers = parse_layers(layers, self.num_ws) if space == "w+" else None
        self.driver = _SynthesisDriver(synthesis, self.num_ws, self.w_dim, per_layer=space == "w+").eval()
        self.site = Site("", "input")  # the synthesis input: w (or ws)
        self.latent_dim = self.w_dim * (self.num_ws if space == "w+" else 1)  # what the driver reads
        self.direction_dim = self.w_dim  # directions live in W, also in W+ (they are placed on ``layers``)
        self.max_batch = max_batch
        self._features = {}
        self.directions: torch.Tensor | None = None
        self.provenance: dict[str, Any] = {}
        self._w_samples = self._mapped(torch.randn(stats_samples, self.z_dim, generator=torch.Generator().manual_seed(1)))
        self.output_range = (0.0, 1.0)
        with torch.no_grad():
            images = self.driver(self.sample_bases(8, seed=0).to(self.device))
        self.output_range = (-1.0, 1.0) if float(images.min()) < -0.01 else (0.0, 1.0)

    @torch.no_grad()
    def _mapped(self, z: torch.Tensor) -> torch.Tensor:
        """w (n, w_dim) for latents z (one w per image: the first layer's when mapping broadcasts)."""
        w = torch.cat([self.mapping(z[i:i + self.max_batch].to(self.device)).float().cpu()
                       for i in range(0, len(z), self.max_batch)])
        return w[:, 0] if w.ndim == 3 else w

    def sample_bases(self, n: int, seed: int = 0) -> torch.Tensor:
        if n < 1:
            raise ValueError(f"need at least 1 base latent, got {n}")
        w = self._mapped(torch.randn(n, self.z_dim, generator=torch.Generator().manual_seed(seed)))
        return w.repeat(1, self.num_ws) if self.space == "w+" else w

    def set_directions(self, directions: Any) -> None:
        """Directions (K, w_dim) in W (in W+ they are applied to ``layers``); each is normalised."""
        from ..directions import Directions

        found = directions if isinstance(directions, Directions) else Directions(torch.as_tensor(directions, dtype=torch.float32))
        vectors = found.vectors.float().reshape(len(found), -1)
        if vectors.shape[1] == self.latent_dim and self.space == "w+" and self.latent_dim != self.w_dim:
            vectors = vectors.view(len(vectors), self.num_ws, self.w_dim)[:, self.layers[0]]  # a finder ran on W+
        if vectors.shape[1] != self.w_dim:
            raise ValueError(f"directions have {vectors.shape[1]} values each, but w has {self.w_dim}")
        self.directions = vectors / vectors.norm(dim=1, keepdim=True)
        self.provenance = dict(found.provenance)

    @property
    def n_latents(self) -> int:
        return self.w_dim if self.directions is None else len(self.directions)

    def latent_id(self, index: int) -> str:
        return f"w{index}" if self.directions is None else f"d{index}"

    def unit_steps(self, indices: Sequence[int]) -> torch.Tensor:
        """(K, latent_dim): for each direction v, std(<w, v>) * v, placed on the edited layers in W+."""
        vectors = self.directions[list(indices)] if self.directions is not None else torch.eye(self.w_dim)[list(indices)]
        centred = self._w_samples - self._w_samples.mean(0)
        steps = vectors * (centred @ vectors.T).std(0)[:, None]
        if self.space == "w":
            return steps
        full = torch.zeros(len(steps), self.num_ws, self.w_dim)
        full[:, self.layers] = steps[:, None, :]
        return full.reshape(len(steps), -1)

    def traverse(self, indices: Sequence[int], bases: torch.Tensor, strengths: Sequence[float] | torch.Tensor,
                 rows: int = 1, **_: Any) -> list[Traversal]:
        """Each direction's strip: w + s * std(<w, v>) * v for every strength s (on ``layers`` in W+)."""
        if rows > 1:
            raise ValueError(f"a direction in W has no other latent to clamp, so the bias cannot compare {rows} rows: "
                             "use the combination bias")
        indices = [self.check_index(i) for i in indices]
        check_strengths(strengths)
        out = super().traverse([], bases, strengths, 1, directions=self.unit_steps(indices))
        for traversal, i in zip(out, indices):
            traversal.latent_id, traversal.index, traversal.rule = self.latent_id(i), i, "add"
            traversal.meta |= {"space": self.space, "layers": self.layers}
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe() | {"space": self.space, "w_dim": self.w_dim, "num_ws": self.num_ws,
                                     "layers": self.layers, "output_range": list(self.output_range)}
        if self.directions is not None:
            info["directions"] = {"count": len(self.directions), "finder": self.provenance.get("finder")}
        return info
