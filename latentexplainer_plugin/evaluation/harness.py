"""The ground-truth benchmark for explanations: run the explainer on a model whose data has known
generative factors, then score what it said.

For every latent: its KL (active or collapsed, ``run.KL_ACTIVE``), the factor it captures
(normalised mutual information, ``factors.captured_factors``, via ``run.latent_stats``), the
explanation and its certainty, the factor the explanation names (``judge.FactorJudge``) and
whether that is right. Certainty is computed under both similarity measures (``embed`` and
``bow``) from the same stored responses; the backend is asked once.

Metrics (per similarity measure, side by side):

* ``factor_accuracy``: among active latents that capture a factor, the share whose explanation is
  clear and names that factor (an unclear answer counts as a miss);
* ``false_clear_rate``: among latents that capture no factor, the share called clear (explaining
  noise; the number to watch on random-weight or collapsed models);
* ``abstention_auroc``: how well certainty separates latents that capture a factor (label 1)
  from those that capture none (label 0), ``sklearn.metrics.roc_auc_score``;
* ``accuracy`` / ``balanced_accuracy`` of "clear" as a predictor of the label at the run's
  threshold, and ``cv``: the same (and ``factor_accuracy``) at thresholds calibrated by
  cross-validation, each latent scored with a threshold learned without it (leave one latent
  out; with several models, :func:`pooled_metrics` leaves one model out);
* ``reference_metrics`` of the kept explanations of factor-aligned latents against reference
  sentences for their factor (BLEU, ROUGE-L, CIDEr-D, METEOR, SPICE, BERTScore; a metric that
  cannot be computed here is reported as unavailable, never as 0);
* the model's ``disentanglement`` metrics on the data: MIG, DCI, SAP.

Writes ``evaluation.json``, ``evaluation.md`` and ``roc.png`` beside the run's ``results.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..types import Response
from .references import factor_references

__all__ = [
    "MEASURES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "abstention_accuracy",
    "abstention_auroc",
    "disentanglement_report",
    "evaluate",
    "evaluate_run",
    "factor_accuracy",
    "measure_rows",
    "pooled_metrics",
    "write_markdown",
    "write_roc",
]

SCHEMA = "latentexplainer-evaluation"
SCHEMA_VERSION = 1
MEASURES = ("agree", "embed", "bow")
EVALUATION_JSON = "evaluation.json"
EVALUATION_MD = "evaluation.md"
ROC_PNG = "roc.png"


# ----------------------------------------------------------------------------- table metrics
# A "row" is one latent under one similarity measure: label (captures a factor), active, factor,
# certainty (None when the latent failed), clear, correct (None when there is no factor or no
# candidate explanation).


def _label(row: dict[str, Any]) -> bool:
    return bool(row["label"]) if "label" in row else row.get("factor") is not None


def factor_accuracy(rows: Sequence[dict[str, Any]]) -> float | None:
    """Share of active, factor-aligned latents whose explanation is clear and names the right
    factor; None when no latent is active and aligned."""
    aligned = [r for r in rows if r.get("active", True) and r.get("factor") is not None and not r.get("unjudgeable")]
    if not aligned:
        return None
    return sum(bool(r.get("clear")) and bool(r.get("correct")) for r in aligned) / len(aligned)


def abstention_auroc(rows: Sequence[dict[str, Any]]) -> float | None:
    """ROC AUC of certainty as a score for "the latent captures a factor" (``label``; default
    ``factor is not None``). Latents without a certainty (failed) are left out. None when only one
    class is present (AUROC is undefined)."""
    from sklearn.metrics import roc_auc_score

    scored = [r for r in rows if r.get("certainty") is not None]
    y = [_label(r) for r in scored]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, [float(r["certainty"]) for r in scored]))


def false_clear_rate(rows: Sequence[dict[str, Any]]) -> float | None:
    """Share of latents that capture no factor but were called clear (the explainer explaining
    noise); None when every latent captures a factor."""
    negatives = [r for r in rows if not _label(r)]
    if not negatives:
        return None
    return sum(bool(r.get("clear")) for r in negatives) / len(negatives)


def abstention_accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Accuracy and balanced accuracy of ``clear`` as a prediction of the label (a failed latent
    is not clear)."""
    if not rows:
        return {"accuracy": None, "balanced_accuracy": None}
    y = np.array([_label(r) for r in rows])
    p = np.array([bool(r.get("clear")) for r in rows])
    acc = float((y == p).mean())
    if y.all() or not y.any():
        return {"accuracy": acc, "balanced_accuracy": None}
    bal = float(((p & y).sum() / y.sum() + (~p & ~y).sum() / (~y).sum()) / 2)
    return {"accuracy": acc, "balanced_accuracy": bal}


def measure_rows(evaluation: dict[str, Any], measure: str, thresholds: Sequence[float] | float | None = None) -> list[dict[str, Any]]:
    """The flat rows of one evaluation under one measure. ``thresholds`` (one value, or one per
    latent) replaces the recorded threshold: ``clear`` is then recomputed as "a majority of the
    answers explain something, certainty >= threshold and the image evidence is consistent"."""
    rows = []
    latents = evaluation["latents"]
    if thresholds is not None and not isinstance(thresholds, (int, float)):
        thresholds = list(thresholds)
        if len(thresholds) != len(latents):
            raise ValueError(f"{len(thresholds)} thresholds for {len(latents)} latents")
    for i, e in enumerate(latents):
        m = e["measures"][measure]
        row = {"id": e["id"], "label": e["label"], "active": e["active"], "factor": e["factor"],
               "certainty": m["certainty"], "clear": m["clear"], "correct": m["correct"],
               "explains": m["candidate"] is not None, "unjudgeable": e.get("unjudgeable"),
               "evidence_consistent": e.get("evidence_consistent", True)}
        if thresholds is not None:
            t = thresholds if isinstance(thresholds, (int, float)) else thresholds[i]
            row["clear"] = bool(row["explains"] and row["certainty"] is not None and row["certainty"] >= t
                                and row["evidence_consistent"])
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- helpers


def _unavailable(value: Any) -> Any:
    from .text_metrics import MetricUnavailable

    if isinstance(value, MetricUnavailable):
        return {"unavailable": True, "reason": value.reason}
    return round(float(value), 4)


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


def _responses(entry: dict[str, Any]) -> list[Response]:
    # the claims recorded with each answer (structured ones from the backend, or parsed) are kept
    return [Response(text=r.get("text"), error=r.get("error"), abstained=bool(r.get("abstained")),
                     meta={"claims": r["claims"]} if isinstance(r.get("claims"), list) else {})
            for r in entry.get("responses") or []]


def _score(entry: dict[str, Any], measure: Any) -> tuple[float | None, str | None]:
    """Certainty and candidate explanation (the medoid; None when most answers abstain) of one
    results.json entry under ``measure``, from its stored responses."""
    from ..uncertainty import select_explanation

    if entry.get("status") != "ok" or not entry.get("responses"):
        return None, None
    try:
        chosen = select_explanation(_responses(entry), measure, threshold=0.0)
    except ValueError:  # every sample failed
        return None, None
    return chosen.certainty, chosen.explanation


_JUDGES: dict[tuple[str, ...], Any] = {}


def _judge_for(names: Sequence[str], factors: np.ndarray | None = None,
               level_names: dict[str, list[str]] | None = None) -> Any:
    """A judge for these factors (cached): factors with few levels and named levels are described
    by them, so any factor names can be judged (``judge.describe_factor``)."""
    from .judge import MAX_LEVELS, FactorJudge

    values: dict[str, np.ndarray] = {}
    if factors is not None:
        for k, name in enumerate(names):
            levels = np.unique(np.asarray(factors)[:, k])
            if len(levels) <= MAX_LEVELS:
                values[name] = levels
    levels = {n: list(v) for n, v in (level_names or {}).items() if n in names}
    key = (tuple(names), tuple((n, tuple(v.tolist())) for n, v in values.items()),
           tuple((n, tuple(v)) for n, v in levels.items()))
    if key not in _JUDGES:
        _JUDGES[key] = FactorJudge(list(names), factor_values=values, level_names=levels)
    return _JUDGES[key]


def _level_names(data: Any, names: Sequence[str], data_path: str | None = None) -> dict[str, list[str]]:
    """``<factor>_names`` arrays (e.g. ``shape_names``: the names of a factor's levels) of the data
    dict, else of the npz at ``data_path`` (``data.load_npz`` keeps only images and factors)."""
    found = {n: data[f"{n}_names"] for n in names if isinstance(data, dict) and f"{n}_names" in data}
    if not found and data_path and Path(data_path).suffix == ".npz" and Path(data_path).is_file():
        try:
            with np.load(data_path, allow_pickle=False) as f:
                found = {n: f[f"{n}_names"] for n in names if f"{n}_names" in f.files}
        except (ValueError, OSError):  # unreadable extras: describe the factors from names and values
            found = {}
    return {n: [str(x) for x in np.asarray(v).reshape(-1)] for n, v in found.items()}


def _subsample(data: dict[str, Any], max_images: int | None, seed: int) -> dict[str, Any]:
    n = len(data["images"])
    if max_images is None or n <= max_images:
        return data
    idx = np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))
    return data | {"images": data["images"][idx], "factors": np.asarray(data["factors"])[idx]}


def _check_data(data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict) or "images" not in data or "factors" not in data:
        raise ValueError("data must hold 'images' (N,H,W,C) uint8 and 'factors' (N,K) with 'factor_names'")
    factors = np.asarray(data["factors"], dtype=np.float64)
    if factors.ndim != 2 or len(factors) != len(data["images"]):
        raise ValueError(f"factors must be (N={len(data['images'])}, K), got {factors.shape}")
    names = [str(n) for n in data.get("factor_names", [f"factor{k}" for k in range(factors.shape[1])])]
    if len(names) != factors.shape[1]:
        raise ValueError(f"{len(names)} factor names for {factors.shape[1]} factors")
    return {"images": data["images"], "factors": factors, "factor_names": names}


# --------------------------------------------------------------------------- per-measure summary


def _summarize_measure(evaluation: dict[str, Any], measure: str, threshold: float, source: str,
                       factor_names: Sequence[str]) -> dict[str, Any]:
    from ..uncertainty import strip_frame
    from .calibration import cross_validated_thresholds

    rows = measure_rows(evaluation, measure)
    scored = [i for i, r in enumerate(rows) if r["certainty"] is not None]
    out: dict[str, Any] = {"threshold": _round(threshold, 6), "threshold_source": source,
                           "auroc": _round(abstention_auroc(rows)),
                           "factor_accuracy": _round(factor_accuracy(rows)),
                           "false_clear_rate": _round(false_clear_rate(rows)),
                           "n_clear": sum(bool(r["clear"]) for r in rows)}
    out |= {k: _round(v) for k, v in abstention_accuracy(rows).items()}
    # held-out thresholds: leave one latent out over the latents with a certainty
    certs = [rows[i]["certainty"] for i in scored]
    labs = [_label(rows[i]) for i in scored]
    cv_t = [threshold] * len(rows)
    cv_info: dict[str, Any] = {"scheme": "leave-one-out", "fallbacks": 0}
    if len(scored) >= 2:
        cv = cross_validated_thresholds(certs, labs, fallback=threshold)
        for i, t in zip(scored, cv.thresholds):
            cv_t[i] = t
        cv_info = {"scheme": f"{cv.scheme} (latents)", "fallbacks": cv.fallbacks}
    cv_rows = measure_rows(evaluation, measure, cv_t)
    used = [cv_t[i] for i in scored]
    out["cv"] = cv_info | {
        "thresholds": [_round(t, 6) for t in cv_t],
        "threshold_mean": _round(float(np.mean(used))) if used else None,
        "threshold_std": _round(float(np.std(used))) if used else None,
        "factor_accuracy": _round(factor_accuracy(cv_rows)),
        "false_clear_rate": _round(false_clear_rate(cv_rows)),
    } | {k: _round(v) for k, v in abstention_accuracy(cv_rows).items()}
    # reference metrics of the kept explanations of factor-aligned latents
    hyps, refs = [], []
    for e in evaluation["latents"]:
        m = e["measures"][measure]
        if e["factor"] is not None and m["clear"] and m["candidate"]:
            hyps.append(strip_frame(m["candidate"]) or m["candidate"])
            refs.append(list(factor_references(e["factor"])))
    if hyps:
        from .text_metrics import reference_metrics

        corpus = [list(factor_references(n)) for n in factor_names]
        metrics = reference_metrics(hyps, refs, df_corpus=corpus)
        out["reference_metrics"] = {"n": len(hyps)} | {k: _unavailable(v) for k, v in metrics.items()}
    else:
        reason = "no clear explanation of a factor-aligned latent to score"
        out["reference_metrics"] = {"n": 0} | {k: {"unavailable": True, "reason": reason}
                                               for k in ("bleu", "rouge_l", "cider", "meteor", "spice", "bertscore")}
    return out


# ------------------------------------------------------------------------------------ evaluate


def evaluate_run(run_dir: str | Path, model: Any, data: dict[str, Any], *, data_path: str | None = None,
                 similarities: Sequence[str] = MEASURES, judge: Any = None, max_images: int | None = 5000,
                 seed: int = 0, disentanglement: bool = True, write: bool = True) -> dict[str, Any]:
    """Score a finished run (``run_dir/results.json``) of ``model`` against ``data``'s factors.

    ``model``: the VAE (with ``encode``) the run explained; ``data``: ``images``, ``factors``
    (N, K), ``factor_names`` (the ``train-vae`` npz layout). At most ``max_images`` images
    (a seeded subsample) are used for KL, captured factors and disentanglement metrics. Returns
    the evaluation (the content of ``evaluation.json``) and, with ``write``, writes
    evaluation.json, evaluation.md and roc.png into ``run_dir``.
    """
    from ..run import KL_ACTIVE, latent_stats
    from ..safe_io import check_target
    from ..store import atomic_write_text, read_results
    from ..uncertainty import get_similarity
    from .calibration import lookup_threshold

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if write:  # a link or special file where an output goes: refused before any work, nothing written
        for name in (EVALUATION_JSON, EVALUATION_MD, ROC_PNG):
            check_target(run_dir / name)
    results = read_results(run_dir / "results.json")
    settings = results.get("settings") or {}
    level_names = _level_names(data, _check_data(data)["factor_names"], data_path)
    data = _subsample(_check_data(data), max_images, seed)
    names = data["factor_names"]
    run_sim = str(settings.get("similarity", "agree"))
    sims = [run_sim] + [s for s in dict.fromkeys(similarities) if s != run_sim]  # the run's measure first
    backend = results.get("backend") or settings.get("backend") or {}
    backend_name = str(backend.get("name", "unknown"))

    import torch

    with torch.no_grad():
        stats = latent_stats(model, data["images"], data["factors"], names)
    t_stats = time.perf_counter()

    thresholds: dict[str, tuple[float, str]] = {}
    measures = {}
    for sim in sims:
        measures[sim] = get_similarity(sim)
        if sim == run_sim and settings.get("threshold") is not None:
            thresholds[sim] = (float(settings["threshold"]), str(settings.get("threshold_source", "run settings")))
        else:
            found = lookup_threshold(backend_name, sim)
            thresholds[sim] = found if found is not None else (measures[sim].default_threshold, f"default ({sim})")

    latents = []
    for entry in sorted(results["latents"], key=lambda e: e["index"]):
        i = entry["index"]
        if i >= len(stats.kl):
            raise ValueError(f"results.json has latent {entry['id']} (index {i}), but the model has {len(stats.kl)} latents")
        match = stats.factors[i]
        rec: dict[str, Any] = {
            "id": entry["id"], "index": i, "status": entry["status"],
            "kl": _round(float(stats.kl[i])), "active": bool(stats.kl[i] > KL_ACTIVE),
            "factor": match.factor, "factor_score": _round(match.score),
            "factor_scores": {k: _round(v) for k, v in match.scores.items()},
            "label": match.factor is not None,
            "explanation": entry.get("explanation") if entry.get("clear") else None,
            # the image side: a traversal without a consistent change is never clear (runs written
            # before evidence was recorded count as consistent)
            "evidence_consistent": bool((entry.get("evidence") or {}).get("consistent", True)),
            "measures": {},
        }
        for sim in sims:
            cert, cand = _score(entry, measures[sim])
            t = thresholds[sim][0]
            rec["measures"][sim] = {"certainty": _round(cert, 6), "candidate": cand,
                                    "clear": bool(cand is not None and cert is not None and cert >= t
                                                  and rec["evidence_consistent"])}
        latents.append(rec)
    t_scores = time.perf_counter()

    judge = judge or _judge_for(names, data["factors"], level_names)
    unjudgeable: dict[str, str] = dict(getattr(judge, "unjudgeable", {}) or {})
    texts = sorted({m["candidate"] for e in latents for m in e["measures"].values() if m["candidate"]})
    verdicts = dict(zip(texts, judge.judge_many(texts))) if texts else {}
    for e in latents:
        for m in e["measures"].values():
            v = verdicts.get(m["candidate"]) if m["candidate"] else None
            m["judged"] = v.to_json() if v is not None else None
            m["named_factor"] = v.factor if v is not None else None
            m["correct"] = None if (v is None or e["factor"] is None or e["factor"] in unjudgeable) \
                else bool(v.names(e["factor"]))
        if e["factor"] in unjudgeable:  # counted apart, never a silent miss
            e["unjudgeable"] = unjudgeable[e["factor"]]
        run_m = e["measures"][run_sim]
        e |= {"certainty": run_m["certainty"], "clear": run_m["clear"], "named_factor": run_m["named_factor"],
              "correct": run_m["correct"]}
    t_judge = time.perf_counter()

    evaluation: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "model": results.get("model") or settings.get("model"), "data": data_path or settings.get("data"),
        "run": str(run_dir / "results.json"), "n_images": int(len(data["images"])),
        "factor_names": list(names), "backend": backend, "bias": results.get("bias") or settings.get("bias"),
        "samples": settings.get("samples"), "seed": settings.get("seed"),
        "similarity": run_sim, "threshold": thresholds[run_sim][0], "threshold_source": thresholds[run_sim][1],
        "similarities": sims, "kl_active": KL_ACTIVE, "factor_min_score": 0.1,
        "judge": judge.describe() if hasattr(judge, "describe") else {"model": "custom"},
        "latents": latents,
    }
    by_sim = {sim: _summarize_measure(evaluation, sim, thresholds[sim][0], thresholds[sim][1], names) for sim in sims}
    t_metrics = time.perf_counter()
    metrics: dict[str, Any] = {
        "n_latents": len(latents),
        "n_failed": sum(e["status"] != "ok" for e in latents),
        "n_active": sum(e["active"] for e in latents),
        "n_aligned": sum(e["label"] for e in latents),
        "n_unjudgeable": sum(bool(e.get("unjudgeable")) and e["active"] for e in latents),
        "unjudgeable_factors": unjudgeable,
        "factor_accuracy": by_sim[run_sim]["factor_accuracy"],
        "false_clear_rate": by_sim[run_sim]["false_clear_rate"],
        "abstention_auroc": by_sim[run_sim]["auroc"],
        "by_similarity": by_sim,
    }
    if disentanglement:
        metrics["disentanglement"] = _disentanglement(model, data)
    evaluation["metrics"] = metrics
    done = time.perf_counter()
    evaluation["timing"] = {"factors_s": round(t_stats - started, 3), "certainty_s": round(t_scores - t_stats, 3),
                            "judge_s": round(t_judge - t_scores, 3), "metrics_s": round(t_metrics - t_judge, 3),
                            "disentanglement_s": round(done - t_metrics, 3), "total_s": round(done - started, 3)}
    if write:
        import json

        from ..store import _jsonable

        for name in (EVALUATION_JSON, EVALUATION_MD, ROC_PNG):  # again: one may have been planted meanwhile
            check_target(run_dir / name)
        atomic_write_text(run_dir / EVALUATION_JSON, json.dumps(_jsonable(evaluation), indent=2, allow_nan=False) + "\n")
        atomic_write_text(run_dir / EVALUATION_MD, markdown(evaluation))
        write_roc(evaluation, run_dir / ROC_PNG)
    return evaluation


def _disentanglement(model: Any, data: dict[str, Any]) -> dict[str, Any]:
    from ..models.training import encode_means

    return disentanglement_report(encode_means(model, data["images"]), data["factors"], data["factor_names"])


def disentanglement_report(codes: np.ndarray, factors: np.ndarray, factor_names: Sequence[str]) -> dict[str, Any]:
    """MIG, DCI and SAP under disentanglement_lib's protocol (``evaluation.disentanglement``), as
    written to evaluation.json: a score is a number, or ``None`` with its reason in
    ``not_meaningful`` (e.g. a single factor); a metric that could not be computed at all is
    ``{"unavailable": true, "reason": ...}``."""
    from .disentanglement import dci, infer_discrete, mig, sap

    factors = np.asarray(factors, dtype=np.float64)
    flags = infer_discrete(factors)
    out: dict[str, Any] = {"protocol": "disentanglement_lib", "n_images": int(len(codes)),
                           "discrete_factors": [n for n, d in zip(factor_names, flags) if d],
                           "continuous_factors": [n for n, d in zip(factor_names, flags) if not d]}
    not_meaningful: dict[str, str] = {}
    for name, fn in (("mig", mig), ("dci", dci), ("sap", sap)):
        try:
            result = fn(codes, factors, flags)
        except ValueError as exc:  # e.g. every factor constant in a tiny dataset
            out[name] = {"unavailable": True, "reason": str(exc)}
            continue
        values = {k: _round(v) for k, v in result.items()}
        out[name] = values[name] if name in values else values
        if result.reason:
            not_meaningful[name] = result.reason
    if not_meaningful:
        out["not_meaningful"] = not_meaningful
    return out


def evaluate(model: Any, data: dict[str, Any] | str | Path, out_dir: str | Path, *, backend: Any = "offline",
             samples: int = 5, similarity: str = "agree", threshold: float | None = None, seed: int = 0,
             bias: str = "disentanglement", resume: bool = False, force: bool = False, progress: bool = False,
             backend_options: dict[str, Any] | None = None, max_images: int | None = 5000,
             model_name: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Explain every latent of ``model`` (a VAE module or a ``train-vae`` directory) into
    ``out_dir`` with :class:`~latentexplainer_plugin.attribution.LatentExplainer` and
    :func:`~latentexplainer_plugin.run.explain_to_dir`, then :func:`evaluate_run` it.

    ``data``: a dict in the npz layout or the path of an npz file. Other keyword arguments go to
    :func:`evaluate_run`.
    """
    from ..attribution import LatentExplainer
    from ..run import explain_to_dir, latent_stats

    data_path = None
    if isinstance(data, (str, Path)):
        from ..data import load_npz

        data_path = str(data)
        data = load_npz(data, need_factors=True)
    if isinstance(model, (str, Path)):
        from ..adapters.vae import load_vae

        model_name = model_name or str(model)
        model = load_vae(model)
    data = _subsample(_check_data(data), max_images, seed)
    stats = latent_stats(model, data["images"], data["factors"], data["factor_names"])
    explainer = LatentExplainer(model, backend=backend, bias=bias, samples=samples, similarity=similarity,
                                threshold=threshold, seed=seed, backend_options=backend_options)
    try:
        explain_to_dir(explainer, out_dir, stats=stats, resume=resume, force=force, progress=progress,
                       header={"model": model_name or type(model).__name__, "data": data_path})
    finally:
        close = getattr(explainer.backend, "close", None)
        if callable(close):
            close()
    return evaluate_run(out_dir, model, data, data_path=data_path, max_images=None, seed=seed, **kwargs)


# --------------------------------------------------------------------------------- across models


def pooled_metrics(evaluations: Sequence[dict[str, Any]], similarities: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics over the latents of several evaluations (e.g. several models), per measure, with
    held-out thresholds learned on the *other* evaluations (leave one model out). An evaluation
    whose training part lacks a class falls back to the measure's recorded threshold."""
    from .calibration import cross_validated_thresholds

    if not evaluations:
        raise ValueError("no evaluations to pool")
    sims = similarities or [s for s in MEASURES if all(s in ev.get("similarities", []) for ev in evaluations)]
    out: dict[str, Any] = {"n_models": len(evaluations)}
    for sim in sims:
        rows, groups, fallback = [], [], []
        for g, ev in enumerate(evaluations):
            rs = measure_rows(ev, sim)
            rows += rs
            groups += [g] * len(rs)
            fallback += [ev["metrics"]["by_similarity"][sim]["threshold"]] * len(rs)
        scored = [i for i, r in enumerate(rows) if r["certainty"] is not None]
        cv = cross_validated_thresholds([rows[i]["certainty"] for i in scored], [_label(rows[i]) for i in scored],
                                        groups=[groups[i] for i in scored], fallback=float("nan"))
        thresholds = list(fallback)
        for i, t in zip(scored, cv.thresholds):
            if not math.isnan(t):
                thresholds[i] = t
        cv_rows = []
        for i, r in enumerate(rows):
            t = thresholds[i]
            cv_rows.append(r | {"clear": bool(r["explains"] and r["certainty"] is not None and r["certainty"] >= t)})
        per_model = {}
        for g, ev in enumerate(evaluations):
            ts = [thresholds[i] for i in range(len(rows)) if groups[i] == g]
            per_model[str(ev.get("model"))] = _round(ts[0], 6) if ts else None
        out[sim] = {
            "auroc": _round(abstention_auroc(rows)),
            "factor_accuracy": _round(factor_accuracy(rows)),
            "cv": {"scheme": cv.scheme + (" (models)" if cv.scheme == "leave-one-group-out" else " (latents)"),
                   "thresholds_per_model": per_model, "fallbacks": cv.fallbacks,
                   "factor_accuracy": _round(factor_accuracy(cv_rows))}
            | {k: _round(v) for k, v in abstention_accuracy(cv_rows).items()},
        }
    return out


# ------------------------------------------------------------------------------ markdown and ROC


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, dict) and x.get("unavailable"):
        return f"unavailable ({x.get('reason')})"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:.{nd}f}" if isinstance(x, float) else str(x)
    return str(x)


def _dis_score(not_meaningful: dict[str, str], metric: str, x: Any) -> str:
    """A disentanglement score as text: "not meaningful" when it is None for a recorded reason."""
    return "not meaningful" if x is None and metric in not_meaningful else _fmt(x)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(ev: dict[str, Any]) -> str:
    """evaluation.md: the per-latent table and the metrics, both similarity measures side by side."""
    sims = ev["similarities"]
    m = ev["metrics"]
    lines = [f"# Evaluation of {ev.get('model')}", "",
             f"- data: {ev.get('data')} ({ev['n_images']} images; factors: {', '.join(ev['factor_names'])})",
             f"- backend: {(ev.get('backend') or {}).get('name')}, {ev.get('samples')} samples, seed {ev.get('seed')}, "
             f"bias {ev.get('bias')}",
             f"- run similarity: {ev['similarity']}, threshold {ev['threshold']:.3f} ({ev['threshold_source']})",
             f"- latents: {m['n_latents']} ({m['n_active']} active, {m['n_aligned']} capture a factor, {m['n_failed']} failed)",
             *([f"- unjudgeable factors ({m.get('n_unjudgeable', 0)} active latents capture one; left out of "
                f"factor_accuracy): " + "; ".join(m["unjudgeable_factors"].values())] if m.get("unjudgeable_factors") else []),
             "", "## Headline", "",
             f"- factor_accuracy: {_fmt(m['factor_accuracy'])}",
             f"- abstention_auroc: {_fmt(m['abstention_auroc'])}", "",
             "## Latents", ""]
    head = ["latent", "KL", "factor (NMI)"] + [f"certainty {s}" for s in sims] + ["clear", "explanation", "names", "right"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in ev["latents"]:
        factor = f"{e['factor']} ({e['factor_score']:.2f})" if e["factor"] else f"none ({e['factor_score']:.2f})"
        certs = [_fmt(e["measures"][s]["certainty"]) for s in sims]
        run_m = e["measures"][ev["similarity"]]
        text = run_m["candidate"] if run_m["clear"] else ("no clear explanation" if e["status"] == "ok" else e["status"])
        lines.append("| " + " | ".join(_cell(c) for c in [e["id"], f"{e['kl']:.2f}" + ("" if e["active"] else " (collapsed)"),
                                                            factor, *certs, _fmt(e["clear"]), text,
                                                            e["named_factor"] if run_m["clear"] else "",
                                                            _fmt(e["correct"]) if run_m["clear"] and e["factor"] else ""]) + " |")
    lines += ["", "## Certainty measures side by side", "",
              "| metric | " + " | ".join(sims) + " |", "|---|" + "---|" * len(sims)]
    by = m["by_similarity"]
    rows = [("threshold", lambda b: f"{b['threshold']:.3f} ({b['threshold_source']})"),
            ("abstention AUROC", lambda b: _fmt(b["auroc"])),
            ("factor accuracy at threshold", lambda b: _fmt(b["factor_accuracy"])),
            ("false-clear rate at threshold", lambda b: _fmt(b["false_clear_rate"])),
            ("abstention accuracy at threshold", lambda b: _fmt(b["accuracy"])),
            ("abstention balanced accuracy at threshold", lambda b: _fmt(b["balanced_accuracy"])),
            ("held-out thresholds (mean ± sd)", lambda b: f"{_fmt(b['cv']['threshold_mean'])} ± {_fmt(b['cv']['threshold_std'])} ({b['cv']['scheme']})"),
            ("factor accuracy, held-out threshold", lambda b: _fmt(b["cv"]["factor_accuracy"])),
            ("abstention accuracy, held-out threshold", lambda b: _fmt(b["cv"]["accuracy"])),
            ("abstention balanced accuracy, held-out threshold", lambda b: _fmt(b["cv"]["balanced_accuracy"])),
            ("clear explanations", lambda b: str(b["n_clear"]))]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(fn(by[s])) for s in sims) + " |")
    lines += ["", "## Reference metrics of the kept explanations (factor-aligned latents)", "",
              "| metric | " + " | ".join(sims) + " |", "|---|" + "---|" * len(sims)]
    reasons: dict[str, str] = {}
    for key in ("n", "bleu", "rouge_l", "cider", "meteor", "spice", "bertscore"):
        cells = []
        for s in sims:
            value = by[s]["reference_metrics"][key]
            if isinstance(value, dict) and value.get("unavailable"):
                reasons.setdefault(key, str(value.get("reason")))
                cells.append("unavailable")
            else:
                cells.append(_fmt(value))
        lines.append(f"| {key} | " + " | ".join(_cell(c) for c in cells) + " |")
    if reasons:
        lines += [""] + [f"- {key} unavailable: {reason}" for key, reason in reasons.items()]
    d = m.get("disentanglement")
    if d:
        dci = d.get("dci") or {}
        nm = d.get("not_meaningful") or {}
        lines += ["", f"## Disentanglement of the model ({d.get('n_images')} images, "
                      f"{d.get('protocol', 'disentanglement_lib')} protocol)", "",
                  "| MIG | DCI disentanglement | DCI completeness | DCI informativeness | SAP |", "|---|---|---|---|---|",
                  "| " + " | ".join(_cell(c) for c in (
                      _dis_score(nm, "mig", d.get("mig")),
                      _dis_score(nm, "dci", dci.get("disentanglement")) if "unavailable" not in dci else _fmt(dci),
                      _dis_score(nm, "dci", dci.get("completeness")), _fmt(dci.get("informativeness")),
                      _dis_score(nm, "sap", d.get("sap")))) + " |"]
        if nm:
            lines += [""] + [f"- {metric.upper()} not meaningful: {reason}" for metric, reason in nm.items()]
    lines += ["", "Metric definitions: docs/evaluation.md. ROC curves: roc.png.", ""]
    return "\n".join(lines)


def write_markdown(ev: dict[str, Any], path: str | Path) -> None:
    """Write :func:`markdown` of ``ev`` to ``path`` atomically; a link or special file there is refused
    (:class:`~latentexplainer_plugin.safe_io.UnsafePathError`) and left untouched."""
    from ..safe_io import atomic_write_text

    atomic_write_text(path, markdown(ev))


def write_roc(ev: dict[str, Any], path: str | Path) -> None:
    """ROC curves of certainty as a detector of factor-aligned latents, one per measure, with the
    run threshold's operating point marked. Drawn with matplotlib's Agg canvas (no pyplot), rendered
    in memory and written atomically: a link or special file at ``path`` is refused
    (:class:`~latentexplainer_plugin.safe_io.UnsafePathError`) and left untouched."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    from .. import safe_io

    safe_io.check_target(path)  # refuse a link before drawing anything

    fig = Figure(figsize=(4.6, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="#bbb", lw=1, ls="--", label="chance")
    notes = []
    styles = (("#1f6fb2", "-", 2.5), ("#d9730d", "--", 1.8), ("#2a9d5c", ":", 1.8), ("#8b3fa8", "-.", 1.8))
    for sim, (colour, ls, lw) in zip(ev["similarities"], styles):
        rows = [r for r in measure_rows(ev, sim) if r["certainty"] is not None]
        y = [_label(r) for r in rows]
        by = ev["metrics"]["by_similarity"][sim]
        if len(set(y)) < 2:
            notes.append(f"{sim}: AUROC undefined ({'all' if y and y[0] else 'no'} latents capture a factor)")
            continue
        c = [r["certainty"] for r in rows]
        fpr, tpr, _ = roc_curve(y, c)
        ax.plot(fpr, tpr, color=colour, lw=lw, ls=ls, label=f"{sim} (AUROC {by['auroc']:.3f})")
        pos = [ci >= by["threshold"] for ci in c]
        n_pos, n_neg = sum(y), len(y) - sum(y)
        ax.plot([sum(p and not t for p, t in zip(pos, y)) / n_neg], [sum(p and t for p, t in zip(pos, y)) / n_pos],
                "o", color=colour, ms=7, mfc="white", mew=2)
    for k, note in enumerate(notes):
        ax.text(0.5, 0.3 - 0.08 * k, note, ha="center", fontsize=7, transform=ax.transAxes)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("false positive rate (latents capturing no factor)")
    ax.set_ylabel("true positive rate (factor-aligned latents)")
    ax.set_title("Certainty as a detector of factor-aligned latents", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    # the format savefig would have taken from the file name (png when it has no suffix)
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    safe_io.atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------ CLI


def summary_lines(ev: dict[str, Any]) -> list[str]:
    m = ev["metrics"]
    lines = [f"evaluation: {m['n_latents']} latents, {m['n_active']} active, {m['n_aligned']} capture a factor"]
    for sim in ev["similarities"]:
        b = m["by_similarity"][sim]
        lines.append(f"  {sim:>5}: factor_accuracy {_fmt(b['factor_accuracy'])}  false_clear {_fmt(b['false_clear_rate'])}  "
                     f"abstention_auroc {_fmt(b['auroc'])}  "
                     f"held-out accuracy {_fmt(b['cv']['accuracy'])} (threshold {b['threshold']:.3f}, {b['threshold_source']})")
    d = m.get("disentanglement") or {}
    if d:
        dci = d.get("dci") if isinstance(d.get("dci"), dict) else {}
        nm = d.get("not_meaningful") or {}
        lines.append(f"  model: MIG {_dis_score(nm, 'mig', d.get('mig'))}  DCI-D {_dis_score(nm, 'dci', dci.get('disentanglement'))}  "
                     f"SAP {_dis_score(nm, 'sap', d.get('sap'))}")
        lines += [f"  {metric.upper()} not meaningful: {reason}" for metric, reason in nm.items()]
    if m.get("unjudgeable_factors"):
        lines.append(f"  unjudgeable factors ({m.get('n_unjudgeable', 0)} active latents, not counted in factor_accuracy): "
                     + "; ".join(m["unjudgeable_factors"].values()))
    return lines
