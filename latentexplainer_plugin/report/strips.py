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


def labelled_grid(traversal: Traversal, bases: Sequence[int] | None = None, min_cell: int = 64,
                  max_width: int = 1200) -> Image.Image:
    """The report's grid: small images enlarged by a whole factor (nearest neighbour, so pixels stay
    sharp) to at least ``min_cell`` pixels, with labelled axes: the latent and its strength on top of
    every column, the base (and the clamped latent's value, for two-row biases) left of every row.
    Images too large for ``max_width`` are shrunk (Lanczos) instead.
    """
    bases = list(range(traversal.n_bases)) if bases is None else list(bases)
    for b in bases:
        if not 0 <= b < traversal.n_bases:
            raise IndexError(f"base {b} out of range: the traversal has {traversal.n_bases} bases")
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = [(b, r) for b in bases for r in range(traversal.n_rows)]
    labels = [f"base {b}" + (f", {traversal.row_labels[r]}" if traversal.row_labels[r] else "") for b, r in rows]
    label_w = int(max(probe.textlength(s, font=font) for s in labels + ["rows:"])) + 8
    steps = len(traversal.strengths)
    h, w = traversal.images.shape[-2:]
    room = (max_width - label_w) / steps - PAD
    factor = max(1, -(-min_cell // max(h, w)))  # ceil
    if w * factor > room:
        factor = max(1, int(room // w))
    cw, ch = w * factor, h * factor
    resample = Image.Resampling.NEAREST
    if cw > room:  # large images: shrink to fit
        cw, ch, resample = max(8, int(room)), max(8, int(room * h / w)), Image.Resampling.LANCZOS
    header = 2 * HEADER + 2
    canvas = Image.new("RGB", (label_w + steps * (cw + PAD) + PAD, header + len(rows) * (ch + PAD) + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), "rows:", fill="#555", font=font)
    draw.text((label_w + PAD, 1), f"columns: {traversal.latent_id[:40]} = strength ->", fill="black", font=font)
    for s, value in enumerate(traversal.strengths.tolist()):
        draw.text((label_w + PAD + s * (cw + PAD), HEADER + 1), f"{value:+g}", fill="black", font=font)
    for k, (b, r) in enumerate(rows):
        y = header + PAD + k * (ch + PAD)
        draw.text((2, y + max(0, ch // 2 - 6)), labels[k], fill="black", font=font)
        for s in range(steps):
            canvas.paste(to_pil(traversal.images[b, r, s]).resize((cw, ch), resample), (label_w + PAD + s * (cw + PAD), y))
    return canvas


def save_strip(traversal: Traversal, path: str | Path, bases: Sequence[int] | None = None, **kwargs) -> Path:
    """Write the report's grid of the traversal (:func:`labelled_grid`) as a PNG and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(traversal, bases=bases, **kwargs).save(path, format="PNG")
    return path
