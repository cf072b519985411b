"""Notebook figures: certainty (and attribution) per latent, and a ranking bar chart.

Plain ``matplotlib.figure.Figure`` objects: no pyplot state, no display needed (Agg renders them);
Jupyter shows a returned Figure inline.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLEAR, UNCLEAR, FAILED, ATTR = "#22aa77", "#dd9900", "#999999", "#3377aa"


def _new(ax: Any, n_rows: int, n_cols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    if ax is not None:
        axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        return axes[0].figure, axes
    fig = Figure(figsize=(4.2 * n_cols, 0.9 + 0.32 * max(1, n_rows)), dpi=90)
    return fig, list(np.atleast_1d(fig.subplots(1, n_cols, sharey=True)))


def results_figure(results: Any, ax: Any = None) -> Any:
    """Horizontal bars: certainty per latent (green clear, orange unclear, grey failed), attribution beside it."""
    rows = list(results)
    has_attr = any(isinstance(r.extras.get("attribution"), (int, float)) for r in rows)
    fig, axes = _new(ax, len(rows), 2 if has_attr else 1)
    labels = [r.id + (f" (#{r.extras['rank']})" if "rank" in r.extras else "") for r in rows]
    y = np.arange(len(rows))
    certainty = [r.certainty or 0.0 for r in rows]
    colors = [FAILED if r.status != "ok" else (CLEAR if r.clear else UNCLEAR) for r in rows]
    axes[0].barh(y, certainty, color=colors)
    axes[0].set_xlim(0, 1)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("certainty")
    threshold = results.info.get("threshold") if hasattr(results, "info") else None
    if isinstance(threshold, (int, float)):
        axes[0].axvline(threshold, color="#555", linestyle="--", linewidth=1)
    if has_attr and len(axes) > 1:
        values = [float(r.extras.get("attribution") or 0.0) for r in rows]
        axes[1].barh(y, values, color=ATTR)
        method = next((r.extras.get("attribution_method") for r in rows if r.extras.get("attribution_method")), None)
        axes[1].set_xlabel(f"mean |attribution|{' (' + method + ')' if method else ''}")
    fig.tight_layout()
    return fig


def ranking_figure(ranking: Any, ax: Any = None) -> Any:
    """Mean |attribution| per latent in rank order, with the spread over inputs as error bars."""
    order = ranking.order
    fig, axes = _new(ax, len(order))
    y = np.arange(len(order))
    spread = ranking.attributions.abs().std(0).numpy() if len(ranking.attributions) > 1 else np.zeros(len(order))
    axes[0].barh(y, ranking.importance[order], xerr=spread[order], color=ATTR)
    axes[0].set_yticks(y, [ranking.ids[i] for i in order])
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"mean |attribution| of '{ranking.score}'")
    axes[0].set_title(ranking.method, fontsize=10)
    fig.tight_layout()
    return fig
