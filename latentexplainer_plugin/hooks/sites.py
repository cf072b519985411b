"""Latent sites: find them in a model, check edits against them, probe their shape."""

from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from torch import nn

from ..types import SITE_KINDS, Edit, Site
from ..errors import SiteError, EditError  # noqa: F401 (re-exported)

# Blocks whose output is a tuple in which the residual stream that continues the block's input is
# not element 0: diffusers' joint (MMDiT) blocks take the image tokens as ``hidden_states`` and
# return ``(encoder_hidden_states, hidden_states)`` = (text, image). An update site on them is the
# image stream's update. A module can declare its own index with ``latentexplainer_update_index``.
UPDATE_OUTPUT_INDEX: dict[str, int] = {"JointTransformerBlock": 1, "FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}


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
    parent, _, last = path.rpartition(".")
    if parent and parent in modules and difflib.get_close_matches(last.lower(), SITE_KINDS, n=1, cutoff=0.6):
        # "block.updat": a misspelt site kind, not a missing module
        hint += (f"; if {last!r} was meant as the site kind, a site is MODULE.KIND with KIND one of "
                 f"{', '.join(SITE_KINDS)} (e.g. {parent}.update)")
    raise SiteError(f"module path {path!r} is not in {type(model).__name__}; {hint}")


def update_output_index(module: nn.Module) -> int:
    """Which element of ``module``'s tuple output continues its input (1 for diffusers' joint blocks, else 0)."""
    declared = getattr(module, "latentexplainer_update_index", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    return UPDATE_OUTPUT_INDEX.get(type(module).__name__, 0)


def output_part(value: Any, index: int) -> Any:
    """Element ``index`` of a tuple / list output; a plain tensor output is its own part."""
    return value[index] if isinstance(value, (tuple, list)) else value


def with_output_part(value: Any, index: int, part: torch.Tensor) -> Any:
    """``value`` with its element ``index`` replaced by ``part`` (a plain tensor output: ``part``)."""
    if isinstance(value, tuple):
        return value[:index] + (part,) + value[index + 1:]
    if isinstance(value, list):
        return value[:index] + [part] + value[index + 1:]
    return part


def first_input(args: tuple, kwargs: dict) -> Any:
    """A module call's first argument: the first positional one, else the first keyword one (diffusers
    blocks are called as ``block(hidden_states=..., ...)``)."""
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise SiteError("the module was called without arguments: an input or update site needs its first argument")


def block_update(site: Site | str, inputs: Any, output: Any, index: int = 0) -> torch.Tensor:
    """u = output[index] - input of one call of the block at ``site``; input and output must have the same shape."""
    out = output_part(output, index)
    if not (torch.is_tensor(inputs) and torch.is_tensor(out)):
        raise SiteError(f"update site {site}: the block's input and output must be tensors, got "
                        f"{type(inputs).__name__} and {type(out).__name__}")
    if inputs.shape != out.shape:
        raise SiteError(
            f"update site {site}: the block's input has shape {tuple(inputs.shape)} and its output {tuple(out.shape)}; "
            "an update (output - input) needs the same shape: use the .input or .output site of this module, or a "
            "block that keeps the shape (a transformer block, a ResNet block without down/upsampling, a mid block)")
    return out - inputs


def register_site_hooks(module: nn.Module, site: Site, record: Callable[[torch.Tensor], Any]) -> list[Any]:
    """Torch hooks on ``module`` that call ``record(value)`` with the value at ``site`` on every call:
    its first input, its output (element 0 of a tuple) or its update (output - input). Returns the handles."""
    if site.kind == "input":
        return [module.register_forward_pre_hook(lambda m, a, kw: record(first_input(a, kw)), with_kwargs=True)]
    if site.kind == "output":
        return [module.register_forward_hook(lambda m, a, out: record(output_part(out, 0)))]
    index, seen = update_output_index(module), []
    pre = module.register_forward_pre_hook(lambda m, a, kw: seen.append(first_input(a, kw)), with_kwargs=True)
    post = module.register_forward_hook(lambda m, a, out: record(block_update(site, seen.pop(), out, index)))
    return [pre, post]


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

    handles = register_site_hooks(module, site, record)
    try:
        model(*args, **kwargs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise SiteError(f"site {site} was never called during the forward pass of {type(model).__name__}")
    return found[0]


def probe_shape(model: nn.Module, site: Site, *args, **kwargs) -> torch.Size:
    """Shape of the activation at ``site`` for these inputs, by running the model only up to the site."""
    return site_activation(model, site, *args, **kwargs).shape
