"""Calibrated certainty thresholds: learned from labelled runs, stored per (backend, similarity),
picked up by ``LatentExplainer`` when no threshold is given; and held-out (cross-validated)
thresholds for scoring.

The label of a latent is "it captures a ground-truth factor" (``evaluation.json``: ``label``). A
threshold is chosen by :func:`latentexplainer_plugin.uncertainty.calibrate_threshold` (best
balanced accuracy of ``certainty >= t`` as a predictor of the label).

Where calibrations live: ``$LATENTEXPLAINER_THRESHOLDS`` when set (a file path; ``none`` or
``off`` turns calibrations off), else ``$XDG_CONFIG_HOME/latentexplainer/thresholds.json``, else
``~/.config/latentexplainer/thresholds.json``. Layout::

    {"version": 1,
     "thresholds": {"offline": {"embed": {"threshold": 0.61, "n": 20, "n_positive": 12,
                                          "held_out": {...}, "runs": [...], "created": "..."}}}}

This module imports nothing heavy: ``LatentExplainer`` reads the file through it on every
construction.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "THRESHOLDS_ENV",
    "CrossValidatedThresholds",
    "calibrate_runs",
    "cross_validated_thresholds",
    "load_evaluation",
    "lookup_threshold",
    "read_thresholds",
    "resolve_threshold",
    "thresholds_path",
    "write_thresholds",
]

from ..uncertainty.thresholds import (  # noqa: E402,F401 (the file's reading side lives with certainty)
    FILE_VERSION,
    THRESHOLDS_ENV,
    THRESHOLDS_FILE,
    lookup_threshold,
    read_thresholds,
    resolve_threshold,
    thresholds_path,
    write_thresholds,
)


# ------------------------------------------------------------------------ held-out thresholds


@dataclass
class CrossValidatedThresholds:
    """Per item, a threshold chosen without that item.

    ``scheme``: ``"leave-one-out"`` (items), ``"leave-one-group-out"`` (e.g. models) or
    ``"k-fold (k=K)"``; ``fallbacks``: items whose training part lacked one class, so they got
    ``fallback`` instead; ``folds[i]``: the fold (group) item ``i`` was scored in.
    """

    thresholds: list[float]
    scheme: str
    fallbacks: int = 0
    folds: list[int] = field(default_factory=list)


def cross_validated_thresholds(
    certainties: Sequence[float],
    labels: Sequence[bool],
    groups: Sequence[Any] | None = None,
    k: int | None = None,
    fallback: float = 0.5,
) -> CrossValidatedThresholds:
    """Thresholds for each item, each calibrated (``uncertainty.calibrate_threshold``) only on the
    items of the other folds: never on the item it is applied to.

    Folds: one per distinct ``groups`` value when there are at least two (leave one model out),
    else ``k`` contiguous folds when ``k`` is given, else one item per fold (leave one out). A
    training part with only one class cannot be calibrated; its items get ``fallback``.
    """
    from ..uncertainty import calibrate_threshold

    certs = [float(c) for c in certainties]
    labs = [bool(x) for x in labels]
    n = len(certs)
    if n != len(labs):
        raise ValueError(f"certainties and labels differ in length: {n} vs {len(labs)}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} items")
    if groups is not None and len(set(groups)) >= 2:
        order = list(dict.fromkeys(groups))
        folds = [order.index(g) for g in groups]
        scheme = "leave-one-group-out"
    elif k is not None:
        if k < 2 or k > n:
            raise ValueError(f"k must be in 2..{n}, got {k}")
        folds = [i * k // n for i in range(n)]
        scheme = f"k-fold (k={k})"
    else:
        folds = list(range(n))
        scheme = "leave-one-out"
    thresholds = [fallback] * n
    fallbacks = 0
    for fold in sorted(set(folds)):
        train = [i for i in range(n) if folds[i] != fold]
        test = [i for i in range(n) if folds[i] == fold]
        y = [labs[i] for i in train]
        if not train or all(y) or not any(y):
            fallbacks += len(test)
            continue
        t = calibrate_threshold([certs[i] for i in train], y)
        for i in test:
            thresholds[i] = t
    return CrossValidatedThresholds(thresholds, scheme, fallbacks, folds)


# ------------------------------------------------------------------------------------ calibrate


def load_evaluation(path: str | os.PathLike) -> dict[str, Any]:
    """An evaluation.json, given as the file or as the run directory that holds it."""
    p = Path(path)
    if p.is_dir():
        p = p / "evaluation.json"
    if not p.is_file():
        raise ValueError(f"{path}: no evaluation.json (run `latentexplainer evaluate` first)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} cannot be read: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != "latentexplainer-evaluation" or not isinstance(data.get("latents"), list):
        raise ValueError(f"{p} is not an evaluation.json written by `latentexplainer evaluate`")
    data["_path"] = str(p.resolve())
    return data


def labelled(evaluation: dict[str, Any], similarity: str) -> tuple[list[float], list[bool]]:
    """(certainties, labels) of the latents of one evaluation that have a certainty under ``similarity``."""
    certs, labs = [], []
    for e in evaluation["latents"]:
        m = (e.get("measures") or {}).get(similarity) or {}
        if m.get("certainty") is None:
            continue
        certs.append(float(m["certainty"]))
        labs.append(bool(e["label"]))
    return certs, labs


def calibrate_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
                   write: bool = True) -> dict[str, Any]:
    """Learn a threshold per (backend name, similarity) from evaluated runs and save it.

    Every similarity measured in the runs (``embed`` and ``bow``) is calibrated. Each entry also
    reports how well such a threshold does on data it was not learned from: leave one run out
    when there are several runs of that backend, else leave one latent out.
    Returns ``{"path": file or None, "thresholds": {backend: {similarity: entry}}}``.
    """
    from ..uncertainty import SIMILARITIES, calibrate_threshold, get_similarity

    if not runs:
        raise ValueError("give at least one evaluated run directory (or evaluation.json)")
    evaluations = [load_evaluation(r) for r in runs]
    pooled: dict[tuple[str, str], dict[str, list]] = {}
    for g, ev in enumerate(evaluations):
        backend = str((ev.get("backend") or {}).get("name") or "unknown")
        for sim in ev.get("similarities", []):
            certs, labs = labelled(ev, sim)
            slot = pooled.setdefault((backend, sim), {"c": [], "y": [], "g": [], "runs": []})
            slot["c"] += certs
            slot["y"] += labs
            slot["g"] += [g] * len(certs)
            slot["runs"].append(ev["_path"])
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    problems = []
    for (backend, sim), slot in sorted(pooled.items()):
        c, y = slot["c"], slot["y"]
        if not any(y) or all(y):
            problems.append(f"{backend}/{sim}: the runs hold only {'positive' if any(y) else 'negative'} latents "
                            f"({len(y)} latents); calibration needs latents that capture a factor and latents that capture none")
            continue
        t = calibrate_threshold(c, y)
        default = get_similarity(sim).default_threshold if sim in SIMILARITIES else 0.5
        cv = cross_validated_thresholds(c, y, groups=slot["g"], fallback=default)
        pred = [ci >= ti for ci, ti in zip(c, cv.thresholds)]
        tp = sum(p and yi for p, yi in zip(pred, y))
        tn = sum((not p) and (not yi) for p, yi in zip(pred, y))
        npos, nneg = sum(y), len(y) - sum(y)
        entries.setdefault(backend, {})[sim] = {
            "threshold": round(float(t), 6),
            "n": len(y),
            "n_positive": npos,
            "held_out": {
                "scheme": cv.scheme,
                "accuracy": round((tp + tn) / len(y), 4),
                "balanced_accuracy": round((tp / npos + tn / nneg) / 2, 4),
                "fallbacks": cv.fallbacks,
            },
            "runs": slot["runs"],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    if not entries:
        raise ValueError("nothing to calibrate: " + "; ".join(problems or ["the runs hold no certainties"]))
    path = write_thresholds(entries, out) if write else None
    return {"path": str(path) if path else None, "thresholds": entries, "skipped": problems}
