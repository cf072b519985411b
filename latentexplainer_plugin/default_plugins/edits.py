"""Built-in edit rules: ``add`` (a + strength * direction), ``set`` (coordinate ``index`` := strength) and
``sae`` (SAE feature k := a, keeping the reconstruction error).

Each rule is registered like a third-party one: a callable ``rule(activation, edit)`` with an
optional ``validate(edit, shape)`` that the edit path calls before the forward pass.
"""

from __future__ import annotations

import math

import torch

from ..errors import EditError
from ..hookspecs import hookimpl
from ..types import Edit


class _Add:
    """a + strength * direction (one direction for the batch, or one per item)."""

    @staticmethod
    def validate(edit: Edit, shape: tuple[int, ...]) -> None:
        if edit.direction is None:
            raise EditError("the 'add' rule needs a direction")
        d, features = tuple(edit.direction.shape), tuple(shape[1:])
        if d != features and d != tuple(shape):
            raise EditError(
                f"edit direction has shape {d}, but the activation at the site has shape {tuple(shape)}; the direction "
                f"must have shape {features} (one for all samples) or {tuple(shape)} (one per sample)"
            )

    def __call__(self, activation: torch.Tensor, edit: Edit) -> torch.Tensor:
        strengths = torch.as_tensor(edit.strengths).to(device=activation.device, dtype=activation.dtype)
        direction = edit.direction.to(device=activation.device, dtype=activation.dtype)
        scale = strengths.view(activation.shape[0], *([1] * (activation.ndim - 1)))
        return activation + scale * direction


class _Set:
    """coordinate ``index`` of the flattened activation := strength (the paper's latent traversal)."""

    @staticmethod
    def validate(edit: Edit, shape: tuple[int, ...]) -> None:
        if edit.index is None:
            raise EditError("the 'set' rule needs an index")
        batch, n = shape[0], math.prod(shape[1:])
        index = torch.as_tensor(edit.index)
        if index.ndim not in (0, 1) or (index.ndim == 1 and len(index) != batch):
            raise EditError(f"edit index must be an int or one index per batch item ({batch}), got shape {tuple(index.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= n:
            raise EditError(
                f"edit index {index.tolist()} is out of range for an activation of shape {tuple(shape)} "
                f"({n} features per item: allowed 0..{n - 1})"
            )

    def __call__(self, activation: torch.Tensor, edit: Edit) -> torch.Tensor:
        batch = activation.shape[0]
        strengths = torch.as_tensor(edit.strengths).to(device=activation.device, dtype=activation.dtype)
        flat = activation.reshape(batch, -1).clone()
        index = torch.as_tensor(edit.index, device=activation.device).expand(batch)
        flat[torch.arange(batch, device=activation.device), index] = strengths
        return flat.view_as(activation)


@hookimpl
def latentexplainer_register_edit_rules(register):
    from ..sae.steering import RULE, SAERule

    register("add", _Add())
    register("set", _Set())
    register(RULE, SAERule())  # set an SAE feature, keeping the SAE's error (sae/steering.py)
