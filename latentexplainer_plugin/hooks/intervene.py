"""Capture and edit latents at a site with nnsight interventions.

The model can call the site once (a decoder) or many times (a sampling loop whose forward runs
the denoiser N times): pass ``calls=N`` and the k-th call of the site is the k-th step.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from nnsight import NNsight, save
from torch import nn

from ..plugins import hook
from ..types import Edit, Site
from .sites import EditError, check_finite, probe_shape, resolve_module, validate_edit

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


def apply_edit(activation: torch.Tensor, edit: Edit) -> torch.Tensor:
    """Edit one activation through the ``latentexplainer_edit`` hook (first plugin that knows the rule)."""
    if edit.rule in ("add", "set"):
        validate_edit(edit, activation.shape)
    result = hook().latentexplainer_edit(activation=activation, edit=edit)
    if result is None:
        raise EditError(f"no plugin implements the edit rule {edit.rule!r} (built-in rules: add, set)")
    if result.shape != activation.shape:
        raise EditError(f"edit rule {edit.rule!r} returned shape {tuple(result.shape)} for an activation of shape {tuple(activation.shape)}")
    return result


def _edit_value(value: Any, edit: Edit) -> Any:
    if isinstance(value, tuple):  # modules returning (tensor, extras...): edit the tensor
        return (apply_edit(value[0], edit),) + tuple(value[1:])
    return apply_edit(value, edit)


def _check_calls(calls: int) -> None:
    if not isinstance(calls, int) or calls < 1:
        raise ValueError(f"calls must be an int >= 1 (how many times the forward pass calls the site), got {calls!r}")


def capture(model: nn.Module, site: Site, *args, calls: int = 1, observe: bool = True, **kwargs) -> list[torch.Tensor]:
    """Run ``model(*args, **kwargs)`` and return the activation at ``site`` for each of ``calls`` calls.

    Every captured activation is also passed to the ``latentexplainer_latent_captured`` hook.
    """
    _check_calls(calls)
    resolve_module(model, site.path)
    wrapped = wrap(model)
    with wrapped.trace(*args, **kwargs) as tracer:
        saved = save([])  # values that are not saved are unbound after the trace
        envoy = _envoy(wrapped, site.path)
        if calls == 1:
            value = envoy.input if site.kind == "input" else envoy.output
            saved.append(value)
        else:
            for _ in tracer.iter[:calls]:
                value = envoy.input if site.kind == "input" else envoy.output
                saved.append(value)
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
    resolve_module(model, site.path)
    if edit.rule in ("add", "set"):
        shape = expected_shape if expected_shape is not None else probe_shape(model, site, *args, **kwargs)
        validate_edit(edit, shape)
    elif edit.direction is not None:
        check_finite(edit.direction, "edit direction")
    window = set(range(calls)[edit.calls]) if edit.calls is not None else set(range(calls))
    wrapped = wrap(model)
    with wrapped.trace(*args, **kwargs) as tracer:
        envoy = _envoy(wrapped, site.path)
        if calls == 1:
            if site.kind == "input":
                envoy.input = _edit_value(envoy.input, edit)
            else:
                envoy.output = _edit_value(envoy.output, edit)
        else:
            for step in tracer.iter[:calls]:
                if step in window:
                    if site.kind == "input":
                        envoy.input = _edit_value(envoy.input, edit)
                    else:
                        envoy.output = _edit_value(envoy.output, edit)
        result = wrapped.output.save()
    return result
