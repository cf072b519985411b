"""Capture and edit latents at a site with nnsight interventions.

The model can call the site once (a decoder) or many times (a sampling loop whose forward runs
the denoiser N times): pass ``calls=N`` and the k-th call of the site is the k-th step.
A site of kind ``update`` is a block's residual update u = output - input: capture returns u, an
edit replaces the output by input + edit(u) (for ``add`` the same as adding to the output).
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

import torch
from nnsight import NNsight, save
from torch import nn

from ..plugins import hook
from ..types import Edit, Site
from .sites import (EditError, block_update, check_finite, output_part, probe_shape, resolve_module, update_output_index,
                    validate_strengths, with_output_part)

_wrapped: "weakref.WeakKeyDictionary[nn.Module, NNsight]" = weakref.WeakKeyDictionary()


def wrap(model: nn.Module) -> NNsight:
    """The nnsight wrapper of ``model`` (made once per model and reused)."""
    if isinstance(model, NNsight):
        return model
    if model not in _wrapped:
        _wrapped[model] = NNsight(model)
    return _wrapped[model]


def _envoy(wrapped: NNsight, path: str) -> Any:
    envoy = wrapped
    for part in path.split(".") if path else []:
        envoy = getattr(envoy, part)
    return envoy


def edit_rule(name: str) -> Any:
    """The registered edit rule ``name``; an unknown name raises EditError listing the registered rules."""
    from ..plugins import UnknownComponentError, registry

    try:
        return registry("edit_rules").get(name).factory
    except UnknownComponentError:
        raise EditError(f"no plugin implements the edit rule {name!r} (registered rules: "
                        f"{', '.join(registry('edit_rules').names())})") from None


def check_edit(edit: Edit, shape: tuple[int, ...]) -> None:
    """Every rule: finite strengths, one per batch item; then the rule's own ``validate(edit, shape)``."""
    rule = edit_rule(edit.rule)
    validate_strengths(edit, shape)
    if edit.direction is not None:
        check_finite(edit.direction, "edit direction")
    validate = getattr(rule, "validate", None)
    if callable(validate):
        validate(edit, shape)


def apply_edit(activation: torch.Tensor, edit: Edit) -> torch.Tensor:
    """Edit one activation with the registered rule ``edit.rule``; the result must keep its shape."""
    check_edit(edit, tuple(activation.shape))
    result = edit_rule(edit.rule)(activation, edit)
    if not torch.is_tensor(result) or result.shape != activation.shape:
        got = tuple(result.shape) if torch.is_tensor(result) else type(result).__name__
        raise EditError(f"edit rule {edit.rule!r} returned {got} for an activation of shape {tuple(activation.shape)}")
    return result


def _edit_value(value: Any, edit: Edit) -> Any:
    if isinstance(value, tuple):  # modules returning (tensor, extras...): edit the tensor
        return (apply_edit(value[0], edit),) + tuple(value[1:])
    return apply_edit(value, edit)


def _read(envoy: Any, site: Site, index: int) -> Any:
    """The value at ``site`` in a trace: the module's input, its output, or its update output[index] - input."""
    if site.kind == "input":
        return envoy.input
    if site.kind == "output":
        return envoy.output
    inputs = envoy.input
    return block_update(site, inputs, envoy.output, index)


def _write(envoy: Any, site: Site, edit: Edit, index: int) -> None:
    """Apply ``edit`` at ``site`` in a trace; at an update site u = out - in the output becomes in + edit(u).

    That output is computed as out + (edit(u) - u): the same value, but coordinates the rule leaves
    alone (a strength 0, the other features of ``set``) keep the block's output bit for bit.
    """
    if site.kind == "input":
        envoy.input = _edit_value(envoy.input, edit)
    elif site.kind == "output":
        envoy.output = _edit_value(envoy.output, edit)
    else:
        inputs, output = envoy.input, envoy.output
        update = block_update(site, inputs, output, index)
        envoy.output = with_output_part(output, index, output_part(output, index) + (apply_edit(update, edit) - update))


def _per_item(value: Any, item_ndim: int) -> bool:
    return torch.is_tensor(value) and value.ndim == item_ndim + 1


def edit_items(edit: Edit, items: slice, item_ndim: int) -> Edit:
    """The part of a batched ``edit`` that belongs to batch ``items`` (a chunk of the batch).

    ``strengths`` always has one value per item; ``direction`` is per item when it has one more dim
    than an item's activation (``item_ndim``), ``index`` when it is a 1-D tensor. Fields of Edit
    subclasses (an SAEEdit's SAE) are kept.
    """
    return replace(edit, strengths=edit.strengths[items],
                   direction=edit.direction[items] if _per_item(edit.direction, item_ndim) else edit.direction,
                   index=edit.index[items] if _per_item(edit.index, 0) else edit.index)


def repeat_edit(edit: Edit, copies: int, item_ndim: int) -> Edit:
    """``edit`` for a batch that holds every item ``copies`` times, copy after copy ([x; x] under
    classifier-free guidance): each copy of an item gets that item's edit."""
    if copies == 1:
        return edit

    def tile(value: Any) -> Any:
        return value.repeat(copies, *([1] * (value.ndim - 1)))

    return replace(edit, strengths=tile(edit.strengths),
                   direction=tile(edit.direction) if _per_item(edit.direction, item_ndim) else edit.direction,
                   index=tile(edit.index) if _per_item(edit.index, 0) else edit.index)


def _check_calls(calls: int) -> None:
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be an int >= 1 (how many times the forward pass calls the site), got {calls!r}")


def capture(model: nn.Module, site: Site, *args, calls: int = 1, observe: bool = True, **kwargs) -> list[torch.Tensor]:
    """Run ``model(*args, **kwargs)`` and return the activation at ``site`` for each of ``calls`` calls.

    Every captured activation is also passed to the ``latentexplainer_latent_captured`` hook.
    """
    _check_calls(calls)
    index = update_output_index(resolve_module(model, site.path))
    wrapped = wrap(model)
    with wrapped.trace(*args, **kwargs) as tracer:
        saved = save([])  # values that are not saved are unbound after the trace
        envoy = _envoy(wrapped, site.path)
        if calls == 1:
            saved.append(_read(envoy, site, index))
        else:
            for _ in tracer.iter[:calls]:
                saved.append(_read(envoy, site, index))
    out = [(v[0] if isinstance(v, tuple) else v).detach() for v in saved]
    if observe:
        for i, activation in enumerate(out):
            hook().latentexplainer_latent_captured(site=site, call=i, activation=activation)
    return out


def run_with_edit(model: nn.Module, site: Site, edit: Edit, *args, calls: int = 1,
                  expected_shape: tuple[int, ...] | None = None, **kwargs) -> Any:
    """Run ``model(*args, **kwargs)`` with ``edit`` applied at ``site``; return the model's output.

    The edit is validated before the edited forward pass: against ``expected_shape`` when the
    caller knows the activation's shape, else against a probe that runs the model up to the site.
    With ``calls > 1`` the edit applies to the calls selected by ``edit.calls`` (all by default).
    """
    _check_calls(calls)
    index = update_output_index(resolve_module(model, site.path))
    shape = expected_shape if expected_shape is not None else probe_shape(model, site, *args, **kwargs)
    check_edit(edit, tuple(shape))
    window = set(range(calls)[edit.calls]) if edit.calls is not None else set(range(calls))
    wrapped = wrap(model)
    with wrapped.trace(*args, **kwargs) as tracer:
        envoy = _envoy(wrapped, site.path)
        if calls == 1:
            _write(envoy, site, edit, index)
        else:
            for step in tracer.iter[:calls]:
                if step in window:
                    _write(envoy, site, edit, index)
        result = wrapped.output.save()
    return result
