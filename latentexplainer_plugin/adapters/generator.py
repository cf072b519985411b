"""Any generator: a module whose ``forward(z)`` (or ``decode(z)``) turns latents into images.

Most GANs are such a module (DCGAN, a StyleGAN generator called with z, a flow's inverse). The
traversal is the VAE adapter's: bases z ~ N(0, I), latent i set to each strength, every
(latent, base, row, step) decoded in batched calls; what differs is how the model is driven:

1. the latent size comes from ``latent_dim=``, else the model's ``latent_dim`` / ``z_dim`` /
   ``nz`` / ``latent_size`` attribute (or its config's), else its first layer's input size;
2. z may need a shape other than (B, D): ``latent_shape=(D, 1, 1)`` for DCGAN-style generators
   (found by itself when the first layer is a ConvTranspose2d);
3. the default site is the generator's own input (every module path still works with ``site=``);
4. the output range is probed once: a generator whose images go below 0 is read as tanh
   output in [-1, 1] (``output_range="auto"``), else [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pydantic import Field

from ..hooks import SiteError, resolve_module
from ..options import ComponentOptions, PositiveInt, SiteName, validate_options
from ..plugins import hook
from ..types import Site
from .vae import VAEAdapter

_LATENT_ATTRS = ("latent_dim", "z_dim", "nz", "latent_size", "dim_z", "zdim", "noise_dim")


class _ForwardDriver(nn.Module):
    """Runs the generator on flat latents (B, D), reshaped to ``latent_shape``; keeps its module paths."""

    def __init__(self, model: nn.Module, latent_shape: tuple[int, ...]):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self._run = model.decode if callable(getattr(model, "decode", None)) else model.forward
        self.latent_shape = latent_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self._run(z.reshape(len(z), *self.latent_shape))
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = getattr(out, "sample", out)
        if not torch.is_tensor(out) or out.ndim != 4:
            raise TypeError(f"the generator must return images (B, C, H, W), got "
                            f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}")
        return out


def discover_latent_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The per-item latent shape a generator expects, from its attributes or first layer; None if unknown."""
    for holder in (model, getattr(model, "config", None)):
        for attr in _LATENT_ATTRS:
            value = getattr(holder, attr, None) if holder is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d))), None)
                return (value, 1, 1) if isinstance(first, nn.ConvTranspose2d) else (value,)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    if isinstance(first, nn.ConvTranspose2d):
        return (first.in_channels, 1, 1)
    return None


class GeneratorAdapter(VAEAdapter):
    """Explain the latent dimensions of any generator ``forward(z) -> images`` (GANs and others).

    Args:
        model: an ``nn.Module`` (a factory's result; see :func:`load_generator` for ``file.py:factory``).
        latent_dim: D, when the model does not tell (see the module docstring).
        latent_shape: the shape one latent must have for the model, e.g. ``(128, 1, 1)``; default (D,).
        site: where the latent lives (default: the generator's input).
        output_range: ``"auto"`` (probed), or the (low, high) range of the generator's images.
    """

    name = "generator"
    capabilities = frozenset({"latent_axes", "directions", "site_edits"})

    class Options(ComponentOptions):
        """Options of the ``generator`` adapter."""

        site: Optional[SiteName] = Field(None, description="latent site (default: the generator's input)")
        latent_dim: Optional[PositiveInt] = Field(None, description="latent size, when the model does not tell (no latent_dim/z_dim/nz)")
        max_batch: PositiveInt = Field(512, description="images generated together")
        device: str = Field("cpu", description="torch device (the run's --device)")

    def __init__(self, model: nn.Module | str | Path, site: Site | str | None = None, latent_dim: int | None = None,
                 latent_shape: tuple[int, ...] | None = None, output_range: Any = "auto", max_batch: int = 512,
                 device: str = "cpu"):
        if isinstance(model, (str, Path)):
            model = load_generator(str(model), latent_dim=latent_dim)
        if not isinstance(model, nn.Module):
            raise TypeError(f"GeneratorAdapter needs a torch nn.Module, got {type(model).__name__}")
        if latent_shape is None:
            found = discover_latent_shape(model)
            if latent_dim is not None:
                latent_shape = (int(latent_dim), *found[1:]) if found else (int(latent_dim),)
            elif found is None:
                raise ValueError(f"cannot tell the latent size of {type(model).__name__}: pass latent_dim=N (the size of z)")
            else:
                latent_shape = found
        latent_shape = tuple(int(v) for v in latent_shape)
        if not latent_shape or any(v < 1 for v in latent_shape):
            raise ValueError(f"latent_shape must be positive sizes, got {latent_shape}")
        dim = 1
        for v in latent_shape:
            dim *= v
        if latent_dim is not None and int(latent_dim) != dim:
            raise ValueError(f"latent_dim={latent_dim} does not match latent_shape {latent_shape} ({dim} values)")
        self.latent_shape = latent_shape
        self.model = model.eval()
        self.driver = _ForwardDriver(model, latent_shape).eval()
        if isinstance(site, str):
            site = Site.parse(site)
        self.site = site or hook().latentexplainer_default_site(model=model) or Site("", "input")
        try:
            resolve_module(self.driver, self.site.path)
        except SiteError as exc:
            raise SiteError(str(exc).replace(type(self.driver).__name__, type(model).__name__, 1)) from None
        self.latent_dim = dim
        validate_options(GeneratorAdapter.Options, {"max_batch": max_batch}, "the generator adapter")  # its own declaration (subclasses may declare other options)
        self.max_batch = max_batch
        self.device = torch.device(device)
        self._features = {}
        self.directions: torch.Tensor | None = None  # (K, D) unit vectors once set_directions is called
        self.provenance: dict[str, Any] = {}
        self.output_range = (0.0, 1.0)
        self.output_range = self._probe_range() if output_range == "auto" else self._check_range(output_range)

    @staticmethod
    def _check_range(output_range: Any) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in output_range)
        except (TypeError, ValueError):
            raise ValueError(f"output_range must be 'auto' or (low, high), got {output_range!r}") from None
        if not hi > lo:
            raise ValueError(f"output_range must be (low, high) with high > low, got {output_range}")
        return lo, hi

    @torch.no_grad()
    def _probe_range(self) -> tuple[float, float]:
        images = self.driver(self.sample_bases(8, seed=0).to(self.device))
        return (-1.0, 1.0) if float(images.min()) < -0.01 else (0.0, 1.0)

    # -- directions (SeFa, GANSpace, a file): traversed with the add rule instead of latent axes
    def set_directions(self, directions: Any) -> None:
        """Explain directions (K, D) in latent space instead of the D latent axes; each is normalised."""
        from ..directions import Directions

        found = directions if isinstance(directions, Directions) else Directions(torch.as_tensor(directions, dtype=torch.float32))
        vectors = found.vectors.float().reshape(len(found), -1)
        if vectors.shape[1] != self.latent_dim:
            raise ValueError(f"directions have {vectors.shape[1]} values each, but the latent has {self.latent_dim}")
        self.directions = vectors / vectors.norm(dim=1, keepdim=True)
        self.provenance = dict(found.provenance)

    @property
    def n_latents(self) -> int:
        return self.latent_dim if self.directions is None else len(self.directions)

    def latent_id(self, index: int) -> str:
        return f"z{index}" if self.directions is None else f"d{index}"

    def traverse(self, indices: Any, bases: torch.Tensor, strengths: Any, rows: int = 1, **kwargs: Any) -> list:
        if self.directions is None:
            return super().traverse(indices, bases, strengths, rows, **kwargs)
        if rows > 1:
            raise ValueError(f"a latent direction has no other latent to clamp, so the bias cannot compare {rows} rows: "
                             "use the combination bias")
        indices = [self.check_index(i) for i in indices]
        out = super().traverse([], bases, strengths, 1, directions=self.directions[indices], **kwargs)
        for traversal, i in zip(out, indices):  # name each by its own direction, not its place in the chunk
            traversal.latent_id, traversal.index = self.latent_id(i), i
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe() | {"latent_shape": list(self.latent_shape), "output_range": list(self.output_range)}
        if self.directions is not None:
            info["directions"] = {"count": len(self.directions), "finder": self.provenance.get("finder")}
        return info


def load_generator(spec: str, latent_dim: int | None = None) -> nn.Module:
    """Call the factory named by ``spec`` and return its module: ``path/to/file.py:factory`` or
    ``package.module:factory`` (the factory takes no arguments, or ``latent_dim=`` when given)."""
    import importlib
    import importlib.util

    from ..safe_load import LoadError

    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise LoadError(f"{spec!r} is not a generator factory: use path/to/file.py:factory or package.module:factory")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise LoadError(f"{spec!r}: no such Python file {path}")
        module_spec = importlib.util.spec_from_file_location(f"latentexplainer_user_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:
            raise LoadError(f"{spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise LoadError(f"{spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise LoadError(f"{spec!r}: cannot import {target}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise LoadError(f"{spec!r}: {target} has no callable {attr!r}; callables there: {', '.join(names[:10]) or '(none)'}")
    try:
        model = factory(latent_dim=latent_dim) if latent_dim is not None else factory()
    except TypeError as exc:
        if latent_dim is None:
            raise LoadError(f"{spec!r}: calling {attr}() failed: {exc}") from exc
        model = factory()
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec!r}: {attr}() returned {type(model).__name__}, not a torch nn.Module")
    return model.eval()


def is_code_spec(text: str) -> bool:
    """True when ``text`` names a factory in code (``file.py:name`` or ``package.module:name``), not a path."""
    target, sep, attr = str(text).rpartition(":")
    if not sep or not target or not attr.isidentifier() or len(target) == 1:  # "C:" drive letters
        return False
    return target.endswith(".py") or all(part.isidentifier() for part in target.split("."))
