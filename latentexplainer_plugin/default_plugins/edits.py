"""Built-in edit rules: ``add`` (a + strength * direction) and ``set`` (coordinate index := strength)."""

from __future__ import annotations

import torch

from ..hookspecs import hookimpl
from ..types import Edit


@hookimpl(trylast=True)
def latentexplainer_edit(activation: torch.Tensor, edit: Edit) -> torch.Tensor | None:
    batch = activation.shape[0]
    strengths = torch.as_tensor(edit.strengths).to(device=activation.device, dtype=activation.dtype)
    if edit.rule == "add":
        direction = edit.direction.to(device=activation.device, dtype=activation.dtype)
        scale = strengths.view(batch, *([1] * (activation.ndim - 1)))
        return activation + scale * direction
    if edit.rule == "set":
        flat = activation.reshape(batch, -1).clone()
        index = torch.as_tensor(edit.index, device=activation.device).expand(batch)
        flat[torch.arange(batch, device=activation.device), index] = strengths
        return flat.view_as(activation)
    return None
