"""The example-set prompt: where a feature fires, contrasted with where it does not.

Every image backend gets the same prompt for an :class:`~latentexplainer_plugin.types.ExampleSet`:
one labelled grid image (the activating examples in one or more rows marked "fires", each dimmed
where the feature is weak so that the bright regions are where it fires; then one row marked
"does not fire") and a text asking what the firing images have in common that the others lack.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..types import ExampleSet, Prompt

EXAMPLES_BIAS = "examples"
EXAMPLES_ABSTAIN = "If the firing images have nothing in common that the others lack, answer exactly: no visible difference."
EXAMPLES_TEMPLATE = (
    "The image shows examples for feature {latent} of a sparse autoencoder. The {n_active} images in the rows marked "
    "'fires' are where {latent} fires most, strongest first (bright regions: where it fires; dimmed regions: where it "
    "does not; the number under each image is its activation). The {n_inactive} images in the row marked 'does not "
    "fire' are where it does not fire at all. What do the firing images have in common that the others lack? "
    "Answer in one sentence that starts with '{latent} fires'."
)
LABEL_WIDTH = 84
CAPTION_HEIGHT = 14
GAP = 4


def _tile(image: torch.Tensor, amap: torch.Tensor | None, scale: float | None, cell: int, floor: float) -> Any:
    from PIL import Image

    from ..sae.examples import overlay

    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if amap is not None:
        arr = overlay(arr, amap.float().cpu(), scale=scale, floor=floor)
    return Image.fromarray(arr[:, :, :3]).resize((cell, cell), Image.NEAREST)


def example_grid(examples: ExampleSet, cell: int = 80, per_row: int = 8, floor: float = 0.25) -> Any:
    """One PIL image: activating rows (labelled "fires", overlaid with graded activation maps and
    captioned with the activation), then one "does not fire" row (at most ``per_row`` images).

    Overlays share one scale, the largest map value, so a weak example looks weaker than a strong one.
    """
    from PIL import Image, ImageDraw

    if cell < 16 or per_row < 1:
        raise ValueError(f"cell must be >= 16 pixels and per_row >= 1, got cell={cell}, per_row={per_row}")
    k, m = examples.n_active, min(examples.n_inactive, per_row)
    active_rows = max(1, -(-k // per_row))
    n_rows = active_rows + 1
    row_h = cell + CAPTION_HEIGHT + GAP
    width = LABEL_WIDTH + per_row * (cell + GAP)
    canvas = Image.new("RGB", (width, n_rows * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    scale = float(examples.maps.max()) if examples.maps is not None and examples.maps.numel() else None
    scale = scale if scale and scale > 0 else None
    for r in range(active_rows):
        y = r * row_h
        draw.text((4, y + cell // 2 - 6), "fires", fill=(0, 0, 0))
        if k == 0:
            draw.text((LABEL_WIDTH, y + cell // 2 - 6), "(never fires)", fill=(120, 120, 120))
        for c, i in enumerate(range(r * per_row, min(k, (r + 1) * per_row))):
            amap = examples.maps[i] if examples.maps is not None else None
            x = LABEL_WIDTH + c * (cell + GAP)
            canvas.paste(_tile(examples.activating[i], amap, scale, cell, floor), (x, y))
            draw.text((x, y + cell + 1), f"{float(examples.activations[i]):.3g}", fill=(0, 0, 0))
    y = active_rows * row_h
    draw.text((4, y + cell // 2 - 6), "does not fire", fill=(0, 0, 0))
    if m == 0:
        draw.text((LABEL_WIDTH, y + cell // 2 - 6), "(none)", fill=(120, 120, 120))
    for c in range(m):
        x = LABEL_WIDTH + c * (cell + GAP)
        canvas.paste(_tile(examples.inactive[c], None, None, cell, floor), (x, y))
        draw.text((x, y + cell + 1), "0", fill=(0, 0, 0))
    return canvas


def build_example_prompt(examples: ExampleSet, max_side: int = 768, cell: int = 80, per_row: int = 8,
                         template: str = EXAMPLES_TEMPLATE) -> Prompt:
    """The prompt for one feature's example set: the text and one labelled grid image (longer side <= ``max_side``)."""
    if not isinstance(examples, ExampleSet):
        raise TypeError(f"examples must be an ExampleSet, got {type(examples).__name__}")
    image = example_grid(examples, cell=cell, per_row=per_row)
    longest = max(image.size)
    if longest > max_side:
        from PIL import Image

        ratio = max_side / longest
        image = image.resize((max(1, round(image.size[0] * ratio)), max(1, round(image.size[1] * ratio))), Image.LANCZOS)
    text = template.format(latent=examples.latent_id, n_active=examples.n_active,
                           n_inactive=min(examples.n_inactive, per_row))
    return Prompt(text=f"{text} {EXAMPLES_ABSTAIN}", images=[image], bias=EXAMPLES_BIAS)


__all__ = ["EXAMPLES_ABSTAIN", "EXAMPLES_BIAS", "EXAMPLES_TEMPLATE", "build_example_prompt", "example_grid"]
