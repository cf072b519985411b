"""Pixel view of a traversal: where the image changes, and where a score's change comes from.

For each explained latent, one PNG (``heatmaps/<id>.png`` beside ``strips/<id>.png``) with:

1. the image at the middle strength of the first base;
2. the change map: mean absolute difference between consecutive traversal steps, averaged over
   channels, steps, rows and bases (no gradients needed, any adapter);
3. where gradients of the score are available: captum ``IntegratedGradients`` of the score
   (mean intensity by default) over the image, from the first step of the traversal (baseline) to
   the last (input), averaged over bases and rows. By completeness its pixels sum to the score's
   change along the traversal: green where the score rises, red where it falls (captum's colours).

Panels 2 and 3 are drawn with ``captum.attr.visualization.visualize_image_attr(...,
use_pyplot=False)`` into one matplotlib Figure (no pyplot, no display).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..types import Traversal

HEATMAPS_DIR = "heatmaps"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


VISIBLE_CHANGE = 2.0 / 255.0  # mean absolute change per pixel below which nothing is visible


def safe_name(latent_id: str) -> str:
    """A file name for a latent id (``z3`` stays ``z3``; anything unusual becomes ``_``)."""
    name = _UNSAFE.sub("_", str(latent_id)).lstrip(".")
    return name or "latent"


def change_map(traversal: Traversal) -> np.ndarray:
    """(H, W): mean |image(step s+1) - image(step s)| over channels, steps, rows and bases."""
    images = traversal.images.detach().float()
    diff = (images[:, :, 1:] - images[:, :, :-1]).abs()  # (n, rows, steps-1, C, H, W)
    return diff.mean(dim=(0, 1, 2, 3)).cpu().numpy()


def _hwc(image: torch.Tensor) -> np.ndarray:
    arr = image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]


def heatmap_figure(traversal: Traversal, score: Any = None, score_name: str | None = None) -> Any:
    """A matplotlib Figure (no pyplot): image, change map, score attribution (when it has a gradient)."""
    from captum.attr import visualization
    from matplotlib.figure import Figure

    from ..ranking import resolve_score

    _, name = resolve_score(score)
    name = score_name or name
    mid = len(traversal.strengths) // 2
    image = _hwc(traversal.images[0, 0, mid])
    change = change_map(traversal)
    from ..ranking import score_attribution

    attr = score_attribution(traversal, score)
    panels = 3 if attr is not None else 2
    fig = Figure(figsize=(2.6 * panels, 2.9), dpi=80)
    axes = fig.subplots(1, panels)
    axes[0].imshow(image)
    axes[0].set_title(f"{traversal.latent_id} at {float(traversal.strengths[mid]):+g}", fontsize=9)

    def draw(ax: Any, values: np.ndarray, title: str, floor: float = 1e-12, **options: Any) -> None:
        # captum normalises every map to its own maximum, so a faint map would look as loud as a
        # strong one: below ``floor`` it is drawn as "no visible change" instead
        if float(np.abs(values).max()) <= floor:
            ax.imshow(np.ones_like(image))
            ax.text(0.5, 0.5, "no visible change", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_title(title, fontsize=9)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "normalize by value approximately 0" on faint maps
            visualization.visualize_image_attr(values, plt_fig_axis=(fig, ax), use_pyplot=False, title=title, **options)
        ax.title.set_fontsize(9)

    peak = float(np.abs(change).max())
    draw(axes[1], change[:, :, None], f"where it changes (max {peak:.2f})", floor=VISIBLE_CHANGE,
         method="heat_map", sign="absolute_value", cmap="magma")
    if attr is not None:
        draw(axes[2], attr, f"score '{name}' (IG)", method="blended_heat_map", sign="all", original_image=image,
             alpha_overlay=0.6)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def save_heatmap(traversal: Traversal, path: str | Path, score: Any = None, score_name: str | None = None) -> Path:
    """Write the heat map PNG of ``traversal`` (atomically: a temp file renamed over it) and return its path."""
    from ..safe_io import atomic_writer, ensure_dir

    path = Path(path)
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    ensure_dir(path.parent)  # heatmaps/ must be a real folder, not a link out of the run directory
    fig = heatmap_figure(traversal, score, score_name)
    with atomic_writer(path) as f:  # no link followed; the temp file is removed on any failure
        fig.savefig(f, format="png")
    return path


class HeatmapWriter:
    """Writes ``heatmaps/<id>.png`` for each finished latent; returns its results.json keys.

    Pass it to ``explain_to_dir(..., extras=HeatmapWriter(out_dir))``. A heat map that cannot be
    drawn never fails the run: the latent simply has no ``heatmap`` key (a warning says why). A
    latent whose image evidence shows no visible change gets none either.
    """

    def __init__(self, out_dir: str | Path, score: Any = None, score_name: str | None = None):
        self.dir = Path(out_dir)
        self.score, self.score_name = score, score_name

    def __call__(self, result: Any) -> dict[str, Any]:
        if result.traversal is None:
            return {}
        evidence = getattr(result, "evidence", None)
        if evidence is not None and not evidence.visible:  # nothing visibly changes: no map of amplified noise
            return {}
        rel = f"{HEATMAPS_DIR}/{safe_name(result.id)}.png"
        try:
            save_heatmap(result.traversal, self.dir / rel, self.score, self.score_name)
        except Exception as exc:  # noqa: BLE001 - a picture is never worth a failed latent
            warnings.warn(f"no heat map for {result.id}: {type(exc).__name__}: {exc}", stacklevel=2)
            return {}
        return {"heatmap": rel}

