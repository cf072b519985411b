"""Traversal images as labelled PNG grids (for people, and for multimodal LLMs)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..types import Traversal

PAD = 2
HEADER = 14


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C,H,W) float in [0,1] -> PIL RGB image."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    return Image.fromarray(np.ascontiguousarray(arr[:3].transpose(1, 2, 0)), "RGB")


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def grid(traversal: Traversal, bases: Sequence[int] | None = None, cell: int | None = None,
         max_side: int = 1024, labels: bool = True) -> Image.Image:
    """One labelled image: a row per (base, row), a column per strength, strengths written on top.

    ``cell`` is the side of one image in pixels (default: the native size, shrunk so that the
    whole grid fits in ``max_side``).
    """
    bases = list(range(traversal.n_bases)) if bases is None else list(bases)
    for b in bases:
        if not 0 <= b < traversal.n_bases:
            raise IndexError(f"base {b} out of range: the traversal has {traversal.n_bases} bases")
    rows = [(b, r) for b in bases for r in range(traversal.n_rows)]
    steps = len(traversal.strengths)
    h, w = traversal.images.shape[-2:]
    label_w = 70 if labels and any(traversal.row_labels) else 0
    header = HEADER if labels else 0
    native = cell or max(h, w)
    scale = min(1.0, (max_side - label_w) / (steps * (native + PAD)), (max_side - header) / (len(rows) * (native + PAD)))
    cw, ch = max(8, int(w * native / max(h, w) * scale)), max(8, int(h * native / max(h, w) * scale))
    canvas = Image.new("RGB", (label_w + steps * (cw + PAD) + PAD, header + len(rows) * (ch + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if labels:
        for s, value in enumerate(traversal.strengths.tolist()):
            draw.text((label_w + PAD + s * (cw + PAD), 1), f"{value:+g}", fill="black", font=font)
    for k, (b, r) in enumerate(rows):
        y = header + PAD + k * (ch + PAD)
        if label_w:
            draw.text((2, y + ch // 2 - 5), traversal.row_labels[r][:12], fill="black", font=font)
        for s in range(steps):
            img = to_pil(traversal.images[b, r, s]).resize((cw, ch), Image.Resampling.LANCZOS)
            canvas.paste(img, (label_w + PAD + s * (cw + PAD), y))
    return canvas


def save_strip(traversal: Traversal, path: str | Path, bases: Sequence[int] | None = None, **kwargs) -> Path:
    """Write the traversal grid as a PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(traversal, bases=bases, **kwargs).save(path, format="PNG")
    return path
