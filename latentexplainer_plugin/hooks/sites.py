"""Latent sites: find them in a model, check edits against them, probe their shape."""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..types import Edit, Site
from ..errors import SiteError, EditError  # noqa: F401 (re-exported)


def module_paths(model: nn.Module) -> list[str]:
    """Every module path of ``model`` (``""`` is the model itself)."""
    return [name for name, _ in model.named_modules()]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path``; an unknown path raises :class:`SiteError` with suggestions."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    candidates = [p for p in modules if p]
    close = difflib.get_close_matches(path, candidates, n=5, cutoff=0.5)
    if not close:  # fall back to paths that share the last component or a prefix
        last = path.rsplit(".", 1)[-1]
        close = [p for p in candidates if p.rsplit(".", 1)[-1] == last or p.startswith(path.split(".")[0])][:5]
    hint = f"closest valid module paths: {', '.join(close)}" if close else (
        f"top-level modules: {', '.join(n for n, _ in model.named_children()) or '(none)'}"
    )
    raise SiteError(f"module path {path!r} is not in {type(model).__name__}; {hint}")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf values with a message naming ``what`` holds them."""
    if not torch.is_tensor(tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bad.any():
            n_nan = int(torch.isnan(tensor).sum())
            raise EditError(
                f"{what} contains {int(bad.sum())} non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} inf) "
                f"out of {tensor.numel()}; latents, directions and strengths must be finite"
            )


def validate_strengths(edit: Edit, shape: torch.Size | tuple[int, ...]) -> None:
    """What every edit rule needs: a batch dimension, and one finite strength per batch item."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise EditError(f"site activation has shape {shape}; expected a batch dimension plus features")
    strengths = torch.as_tensor(edit.strengths)
    check_finite(strengths, "edit strengths")
    if strengths.ndim != 1 or len(strengths) != shape[0]:
        raise EditError(
            f"edit has strengths of shape {tuple(strengths.shape)}, but the activation at the site has shape "
            f"{shape}: give one strength per batch item ({shape[0]})"
        )


class _StopForward(Exception):
    pass


@torch.no_grad()
def site_activation(model: nn.Module, site: Site, *args, **kwargs) -> torch.Tensor:
    """The activation at ``site`` for these inputs (detached), by running the model only up to the site."""
    module = resolve_module(model, site.path)
    found: list[torch.Tensor] = []

    def record(value):
        value = value[0] if isinstance(value, (tuple, list)) else value
        if not torch.is_tensor(value):
            raise SiteError(f"site {site} holds a {type(value).__name__}, not a tensor")
        found.append(value.detach())
        raise _StopForward

    if site.kind == "input":
        handle = module.register_forward_pre_hook(lambda m, a, kw: record(a[0] if a else next(iter(kw.values()))), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, a, out: record(out))
    try:
        model(*args, **kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not found:
        raise SiteError(f"site {site} was never called during the forward pass of {type(model).__name__}")
    return found[0]


def probe_shape(model: nn.Module, site: Site, *args, **kwargs) -> torch.Size:
    """Shape of the activation at ``site`` for these inputs, by running the model only up to the site."""
    return site_activation(model, site, *args, **kwargs).shape
