"""The built-in direction finders as registered components: one calling convention for all.

A registered finder is called ``finder(adapter, *, seed=0, data=None, **options) -> Directions``
(``data``: an npz dataset in the ``train-vae`` layout, for finders that need labelled images). It
may declare ``Options`` (its keyword options), ``capabilities`` (``needs_data``) and ``requires``
(capabilities the adapter must have, e.g. ``inversion``); :class:`Finder` checks ``requires``
before any work. Third-party finders follow the same convention.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

from pydantic import Field

from ..errors import OptionError
from ..options import KNOWN_CAPABILITIES, ComponentOptions, PositiveInt, capabilities_of
from .base import Directions


class Finder:
    """A direction finder with its declarations; ``run(adapter, seed=, data=, **options)`` does the work."""

    def __init__(self, name: str, run: Callable[..., Directions], options: type[ComponentOptions] = ComponentOptions,
                 requires: frozenset[str] = frozenset(), capabilities: frozenset[str] = frozenset(), doc: str = "",
                 check_data: Callable[[Any], Any] | None = None):
        self.name, self.run, self.Options = name, run, options
        if check_data is not None:  # checks the --data npz before any model loads
            self.check_data = check_data
        self.requires, self.capabilities = frozenset(requires), frozenset(capabilities)
        self.__doc__ = doc or run.__doc__

    def check_adapter(self, adapter: Any) -> None:
        """Raise OptionError when ``adapter`` (an instance or its class) lacks what this finder needs."""
        missing = sorted(self.requires - capabilities_of(adapter))
        if missing:
            what = "; ".join(f"{m}: {KNOWN_CAPABILITIES.get(m, m)}" for m in missing)
            name = getattr(adapter, "name", type(adapter).__name__)
            raise OptionError("", [("direction", f"{self.name!r}: this direction finder needs an adapter with {', '.join(missing)} "
                                                 f"({what}); the {name} adapter has {', '.join(sorted(capabilities_of(adapter))) or 'none'}")])

    def __call__(self, adapter: Any, *, seed: int = 0, data: Any = None, **options: Any) -> Directions:
        self.check_adapter(adapter)
        found = self.run(adapter, seed=seed, data=data, **options)
        if not isinstance(found, Directions):
            raise TypeError(f"direction finder {self.name!r} returned {type(found).__name__}, not Directions")
        return found

    def __repr__(self) -> str:
        return f"<direction finder {self.name}>"


class _Count(ComponentOptions):
    n_directions: PositiveInt = Field(8, description="how many directions to find")


class _PCAOptions(_Count):
    n_samples: PositiveInt = Field(32, description="samples whose h is decomposed")


class _PullbackOptions(_Count):
    t: Optional[int] = Field(None, description="timestep of the Jacobian (default: the first sampling step)")
    n_iter: PositiveInt = Field(20, description="power-iteration rounds")


class _SeFaOptions(_Count):
    layer: Optional[str] = Field(None, description="module path of the first layer reading z (default: found)")


class _GANSpaceOptions(_Count):
    n_samples: PositiveInt = Field(2000, description="latents whose early-layer activations are decomposed")
    layer: Optional[str] = Field(None, description="site of the early layer (default: the first layer's output)")


class _ConditionalOptions(ComponentOptions):
    n_directions: Optional[PositiveInt] = Field(None, description="must equal the number of binary factors (one direction each)")


class _AxesOptions(ComponentOptions):
    pass


class _GivenOptions(ComponentOptions):
    file: str = Field(..., description="a directions .safetensors file (K, *site_shape)")
    normalize: bool = Field(True, description="scale every direction to unit norm")

    flag_aliases: ClassVar[dict[str, str]] = {}


def _pca(adapter: Any, *, seed: int = 0, data: Any = None, n_directions: int = 8, n_samples: int = 32) -> Directions:
    from .pca import pca

    return pca(adapter, n_directions=n_directions, n_samples=n_samples, seed=seed)


def _pullback(adapter: Any, *, seed: int = 0, data: Any = None, n_directions: int = 8, t: int | None = None,
              n_iter: int = 20) -> Directions:
    from .pullback import pullback

    return pullback(adapter, n_directions=n_directions, t=t, n_iter=n_iter, seed=seed)


def _sefa(adapter: Any, *, seed: int = 0, data: Any = None, n_directions: int = 8, layer: str | None = None) -> Directions:
    from .gan import sefa

    return sefa(adapter, n_directions=n_directions, seed=seed, layer=layer)


def _ganspace(adapter: Any, *, seed: int = 0, data: Any = None, n_directions: int = 8, n_samples: int = 2000,
              layer: str | None = None) -> Directions:
    from .gan import ganspace

    return ganspace(adapter, n_directions=n_directions, seed=seed, n_samples=n_samples, site=layer)


def labelled_images(data: dict[str, Any] | None) -> tuple[Any, Any, list[str]]:
    """Images (n, C, H, W) in [0, 1] and binary labels (n, L) from an npz in the ``train-vae`` layout.

    Every factor column with exactly two distinct values is a label (its larger value is y = 1).
    """
    import numpy as np
    import torch

    if data is None or "factors" not in data:
        raise ValueError("the conditional finder needs labelled data (data=): a dict in the npz layout with images "
                         "(N,H,W,C) uint8 and binary factors (N,K)")
    factors = np.asarray(data["factors"])
    names = list(data.get("factor_names") or [f"factor{k}" for k in range(factors.shape[1])])
    keep = [k for k in range(factors.shape[1]) if len(np.unique(factors[:, k])) == 2]
    if not keep:
        raise ValueError("no factor in the data is binary (exactly two distinct values); the conditional finder needs binary labels")
    labels = torch.stack([torch.as_tensor(factors[:, k] == factors[:, k].max()) for k in keep], dim=1)
    images = torch.from_numpy(np.ascontiguousarray(data["images"])).permute(0, 3, 1, 2).float() / 255.0
    return images, labels, [str(names[k]) for k in keep]


def _conditional(adapter: Any, *, seed: int = 0, data: Any = None, n_directions: int | None = None) -> Directions:
    from .conditional import conditional

    images, labels, names = labelled_images(data)
    found = conditional(adapter=adapter, images=images, labels=labels, label_names=names)
    if n_directions is not None and n_directions != len(found):
        raise ValueError(f"the conditional finder gives one direction per binary factor ({len(found)}), not {n_directions}")
    return found


def _axes(adapter: Any, *, seed: int = 0, data: Any = None) -> Directions:
    from .axes import axes

    return axes(adapter.n_latents)


def _given(adapter: Any, *, seed: int = 0, data: Any = None, file: str, normalize: bool = True) -> Directions:
    from .axes import given

    return given(file, normalize=normalize)


BUILTIN_FINDERS = (
    Finder("pca", _pca, _PCAOptions, requires=frozenset({"sampling_loop"}),
           doc="principal components of h over samples and the edit window's steps"),
    Finder("pullback", _pullback, _PullbackOptions, requires=frozenset({"sampling_loop"}),
           doc="top singular vectors of the Jacobian from x_t to h (Park et al. 2023), without a dense Jacobian"),
    Finder("conditional", _conditional, _ConditionalOptions, requires=frozenset({"inversion"}),
           capabilities=frozenset({"needs_data"}), doc="difference of class means of h, one per binary factor of --data",
           check_data=labelled_images),
    Finder("sefa", _sefa, _SeFaOptions, requires=frozenset({"latent_axes", "directions"}),
           doc="closed-form factorisation of the first layer's weight (Shen & Zhou 2021)"),
    Finder("ganspace", _ganspace, _GANSpaceOptions, requires=frozenset({"latent_axes", "directions"}),
           doc="PCA of an early layer's activations regressed onto z (Haerkoenen et al. 2020)"),
    Finder("axes", _axes, _AxesOptions, requires=frozenset({"latent_axes", "directions"}),
           doc="the latent axes themselves, as directions"),
    Finder("given", _given, _GivenOptions, requires=frozenset({"directions"}),
           doc="directions from a .safetensors file (also: --direction PATH)"),
)
