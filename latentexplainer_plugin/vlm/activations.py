"""Activations of a VLM's language model at the image-token positions, collected for SAE features.

:func:`collect_image_token_activations` runs the model over images (one chat per image, as the
lenses do) and streams the output of one decoder layer at the image-token positions to disk through
:func:`latentexplainer_plugin.sae.collect.collect_activations` (its ``select`` argument keeps only
the image tokens). When an image's tokens form a square grid, each item is stored as ``(h, w, D)``
(``positions == [h, w]``), so a feature's activations draw as a map over the image.

Works for any architecture whose decoder ``get_decoder()`` finds (see :func:`.lens.language_model`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import VLMError
from .build import PROMPT
from .lens import image_inputs, image_token_id, language_model, select_image_tokens

__all__ = ["collect_image_token_activations", "language_layer_path"]


def language_layer_path(model: Any, layer: int) -> str:
    """The module path of decoder layer ``layer`` (0-based; negative counts from the end) of a VLM's
    language model, e.g. ``model.language_model.layers.1`` (LLaVA, Gemma 3) or
    ``model.text_model.layers.1`` (Idefics3)."""
    layers = language_model(model).layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not -len(layers) <= layer < len(layers):
        raise VLMError(f"layer must be an int in [-{len(layers)}, {len(layers) - 1}] (the language model has "
                       f"{len(layers)} decoder layers), got {layer!r}")
    target = layers[layer]
    for name, module in model.named_modules():
        if module is target:
            return name
    raise VLMError(f"decoder layer {layer} of {type(model).__name__} is not a submodule of the model")


def collect_image_token_activations(model: Any, processor: Any, images: Sequence[Any], layer: int,
                                    out_dir: str | Path, prompt: str = PROMPT, batch_size: int = 16,
                                    grid: bool = True, **kwargs: Any) -> Any:
    """Collect the output of decoder layer ``layer`` at the image-token positions for every image.

    ``images``: ``(N, H, W, 3)`` uint8 arrays or PIL images. With ``grid`` and a square number P of
    image tokens, items are stored as ``(sqrt P, sqrt P, D)`` (row-major patch order), else as
    ``(P, D)``. ``kwargs`` go to :func:`~latentexplainer_plugin.sae.collect.collect_activations`
    (``shard_rows``, ``dtype``, ``max_items``). Returns its manifest."""
    from ..sae.collect import collect_activations
    from ..types import Site

    images = list(images)
    if not images:
        raise VLMError("images is empty; pass at least one (H, W, 3) uint8 image")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise VLMError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for bad in ("select", "layout", "update", "calls"):
        if bad in kwargs:
            raise VLMError(f"{bad} is set by collect_image_token_activations; it cannot be passed")
    path = language_layer_path(model, layer)
    token = image_token_id(model, processor)

    def batches():
        for start in range(0, len(images), batch_size):
            yield dict(image_inputs(processor, images[start:start + batch_size], prompt))

    def select(batch: Any, activation: Any) -> Any:
        picked = select_image_tokens(activation, batch["input_ids"], token)
        side = math.isqrt(picked.shape[1])
        if grid and side * side == picked.shape[1]:
            picked = picked.reshape(picked.shape[0], side, side, picked.shape[-1])
        return picked

    return collect_activations(model, Site(path, "output"), batches, out_dir, layout="channels_last", select=select,
                               **kwargs)
