"""Steering an SAE feature: set feature k to a target activation a, keeping the SAE's error.

The edit (per batch item, with its own k and a):

    h' = h + (a - f_k(h)) * d_k

where ``f_k(h)`` is feature k's activation under the SAE's own encoder and ``d_k`` its decoder
direction (row k of ``W_dec``). Since ``h = SAE(h) + error``, this moves the reconstruction's
feature k to ``a`` and keeps both the other features and the reconstruction error: ``h`` is never
replaced by the reconstruction. On a conv map (B, C, H, W) it applies at every position: f_k(h)
is a (B, H, W) map, and every position gets its own correction toward the same target ``a``.

Batched: one :class:`SAEEdit` carries one feature and one target per batch item, so features x
bases x strengths go through one forward pass.

The rule ``"sae"`` (:class:`SAERule`) is registered by ``default_plugins/edits.py`` through the
``latentexplainer_register_edit_rules`` hook, like the built-in ``add`` and ``set``; its
``validate`` checks the SAE against the site's shape before the edited forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EditError
from ..types import Edit
from .model import SparseAutoencoder

RULE = "sae"


@dataclass
class SAEEdit(Edit):
    """An :class:`Edit` with ``rule="sae"``: per item, feature ``index[b]`` := ``strengths[b]``.

    ``index`` holds one SAE feature per batch item (a (B,) tensor, or one int for all);
    ``strengths`` the target activations (B,). ``sae`` is the SAE; ``feature_axis`` overrides the
    SAE's feature-axis rule (see :mod:`latentexplainer_plugin.sae.model`).
    """

    sae: SparseAutoencoder | None = None
    feature_axis: int | None = None

    def __post_init__(self) -> None:
        if self.rule != RULE:
            raise EditError(f"an SAEEdit has rule {RULE!r}, got {self.rule!r}")


def _per_item(value: Any, batch: int, what: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    if dtype is not None:
        t = t.to(dtype)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim != 1 or len(t) != batch:
        raise EditError(f"the SAE edit needs one {what} per batch item ({batch}), got shape {tuple(t.shape)}")
    return t


def _check(edit: Edit, shape: tuple[int, ...]) -> tuple[SparseAutoencoder, int]:
    sae = getattr(edit, "sae", None)
    if not isinstance(sae, SparseAutoencoder):
        raise EditError(f"the {RULE!r} edit rule needs an SAEEdit carrying the SAE (edit.sae), got "
                        f"{type(edit).__name__} with sae={type(sae).__name__}")
    if edit.index is None:
        raise EditError("the 'sae' edit rule needs index: the SAE feature to set, per batch item")
    axis = sae.check_site(shape, feature_axis=getattr(edit, "feature_axis", None))
    features = torch.as_tensor(edit.index)
    if features.ndim not in (0, 1) or (features.ndim == 1 and len(features) != shape[0]):
        raise EditError(f"the SAE edit needs one feature index per batch item ({shape[0]}), got shape "
                        f"{tuple(features.shape)}")
    if int(features.min()) < 0 or int(features.max()) >= sae.d_sae:
        raise EditError(f"SAE feature index {features.unique().tolist()[:10]} is out of range: the SAE has "
                        f"{sae.d_sae} features (0..{sae.d_sae - 1})")
    return sae, axis


def sae_edit(activation: torch.Tensor, edit: Edit) -> torch.Tensor:
    """Apply ``h' = h + (a - f_k(h)) d_k`` per batch item; ``edit`` is an :class:`SAEEdit`."""
    sae, axis = _check(edit, tuple(activation.shape))
    batch = activation.shape[0]
    features = _per_item(edit.index, batch, "feature index", activation.device).long()
    targets = _per_item(edit.strengths, batch, "target activation", activation.device, sae.W_enc.dtype)
    if not torch.isfinite(targets).all():
        raise EditError(f"SAE edit targets must be finite, got {targets.tolist()[:10]}")

    h = activation.movedim(axis, -1)  # (B, ..., d_in): one vector per position
    current = sae.feature_activation(h, features)  # f_k(h) at every position, (B, ...)
    lead = (batch,) + (1,) * (h.ndim - 2)
    delta = targets.view(lead) - current
    directions = sae.decoder_directions()[features].view(*lead, sae.d_in)  # d_k per item
    edited = h + (delta[..., None] * directions).to(h.dtype)
    return edited.movedim(-1, axis)


class SAERule:
    """The ``sae`` edit rule: ``rule(activation, edit)`` is :func:`sae_edit`; ``validate`` runs before the forward."""

    @staticmethod
    def validate(edit: Edit, shape: tuple[int, ...]) -> None:
        _check(edit, tuple(shape))

    def __call__(self, activation: torch.Tensor, edit: Edit) -> torch.Tensor:
        return sae_edit(activation, edit)
