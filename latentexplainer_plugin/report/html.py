"""report.html: a self-contained page (strips and heat maps beside it, no network) built from results.json.

Every string that a model, a backend or a user provided (explanations, responses, errors, latent
ids, model names, factor names) is HTML-escaped; image paths are only used when they are plain
relative paths inside the run directory. The page has no script and loads nothing from the network.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from ..store import atomic_write_text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;color:#222;max-width:1100px;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.3em}
table.summary{border-collapse:collapse;margin-bottom:1em}
table.summary td{padding:2px 14px 2px 0;vertical-align:top}
table.summary td:first-child{color:#666}
.latent{border:1px solid #ccc;border-radius:8px;padding:12px 14px;margin:16px 0;background:#fff}
.latent h2{margin:0 0 6px 0;font-size:1.15em;display:flex;gap:.5em;align-items:center}
.badge{font-size:.75em;font-weight:600;border-radius:10px;padding:1px 8px;background:#e8e8e8;color:#333}
.badge.rank{background:#dce8f5;color:#1d4f80}
.clear{border-left:6px solid #2a7}
.clear .badge.state{background:#d8f2e6;color:#1b6b48}
.clear .expl{font-size:1.1em}
.unclear{border:2px dashed #d9a400;background:#fffbea}
.unclear .badge.state{background:#ffe9a8;color:#7a5600}
.unclear .expl{color:#7a5600;font-style:italic}
.failed{border:2px solid #c33;background:#fff3f3}
.failed .badge.state{background:#f8d0d0;color:#8b1d1d}
.failed .expl{color:#8b1d1d}
.bar{position:relative;display:inline-block;width:180px;height:10px;background:#eee;border-radius:5px;vertical-align:middle}
.bar span.fill{display:block;height:10px;border-radius:5px;background:#2a7}
.bar span.thr{position:absolute;top:-3px;width:2px;height:16px;background:#444}
.unclear .bar span.fill{background:#d9a400}
.meta{color:#444;font-size:.9em;margin-top:6px}
.images{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;margin-top:8px}
figure{margin:0}
figcaption{font-size:.8em;color:#666}
img.strip{max-width:100%;min-width:220px;image-rendering:pixelated}
img.heat{max-width:100%}
details{margin-top:8px}
details li{margin:2px 0}
.tag{font-size:.8em;color:#666}
"""

_SAFE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")


def _e(value: Any) -> str:
    text = "" if value is None else str(value)
    # a lone surrogate (possible in model output) cannot be written as UTF-8: show U+FFFD instead
    text = text.encode("utf-8", "replace").decode("utf-8")
    return html.escape(text, quote=True)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _src(path: Any) -> str | None:
    """A relative image path inside the run directory, else None (no URLs, no absolute paths, no ..)."""
    if not isinstance(path, str) or not _SAFE_PATH.match(path) or ".." in path.split("/"):
        return None
    return _e(path)


def _factor(entry: dict[str, Any]) -> str:
    factor = entry.get("factor")
    if not isinstance(factor, dict):
        return ""
    name = factor.get("name")
    score = _num(factor.get("score"))
    what = f"captures <b>{_e(name)}</b>" if name else "captures no known factor"
    metric = _e(factor.get("metric") or "score")
    return what + (f" ({metric} {score:.2f})" if score is not None else "")


def _state(entry: dict[str, Any]) -> str:
    if entry.get("status") == "failed":
        return "failed"
    if entry.get("status") == "skipped":
        return "skipped"
    return "clear" if entry.get("clear") and entry.get("status") == "ok" else "unclear"


def _bar(certainty: float, threshold: float | None) -> str:
    width = 100 * max(0.0, min(1.0, certainty))
    thr = ""
    if threshold is not None:
        left = 100 * max(0.0, min(1.0, threshold))
        thr = f"<span class='thr' style='left:{left:.0f}%' title='threshold {threshold:.2f}'></span>"
    return (f"<span class='bar' title='certainty {certainty:.2f}'><span class='fill' style='width:{width:.0f}%'></span>{thr}</span>"
            f" certainty {certainty:.2f}")


def _responses(entry: dict[str, Any]) -> str:
    kept = entry.get("explanation") if entry.get("clear") else None
    items = []
    for r in entry.get("responses") or []:
        if not isinstance(r, dict):
            continue
        if r.get("text") is None:
            items.append(f"<li><i>failed: {_e(r.get('error'))}</i></li>")
            continue
        tags = []
        if kept is not None and r.get("text") == kept:
            tags.append("kept")
            kept = None  # mark one copy only
        if r.get("abstained"):
            tags.append("abstains")
        tag = f" <span class='tag'>({', '.join(tags)})</span>" if tags else ""
        items.append(f"<li>{_e(r.get('text'))}{tag}</li>")
    n = len(items)
    return f"<details><summary>{n} response{'s' if n != 1 else ''}</summary><ol>{''.join(items)}</ol></details>"


def _latent(entry: dict[str, Any], threshold: float | None = None) -> str:
    state = _state(entry)
    lid = entry.get("id")
    rank = entry.get("rank")
    if state == "failed":
        body = f"<div class='expl'>failed: {_e(entry.get('error'))}</div>"
        label = "failed"
    elif state == "skipped":
        body, label = "<div class='expl'>skipped</div>", "skipped"
    elif state == "clear":
        body, label = f"<div class='expl'>{_e(entry.get('explanation'))}</div>", "clear"
    else:
        body, label = "<div class='expl'>No clear explanation: the answers disagree or abstain.</div>", "no clear explanation"
    badges = f"<span class='badge rank'>#{_e(rank)}</span>" if rank is not None else ""
    badges += f"<span class='badge state'>{label}</span>"
    meta = []
    certainty = _num(entry.get("certainty"))
    if certainty is not None:
        meta.append(_bar(certainty, threshold))
    attribution = _num(entry.get("attribution"))
    if attribution is not None:
        signed = _num(entry.get("attribution_signed"))
        delta = _num(entry.get("delta"))
        meta.append(f"attribution {attribution:.3g}" + (f" (signed {signed:+.3g})" if signed is not None else "")
                    + (f", rank {_e(rank)}" if rank is not None else "")
                    + (f", by {_e(entry.get('attribution_method'))}" if entry.get("attribution_method") else "")
                    + (f", convergence delta {delta:.2g}" if delta is not None else ""))
    kl = _num(entry.get("kl"))
    if kl is not None:
        meta.append(f"KL {kl:.2f}" + (" (collapsed)" if entry.get("active") is False else ""))
    factor = _factor(entry)
    if factor:
        meta.append(factor)
    images = []
    strip = _src(entry.get("strip"))
    if strip:
        images.append(f"<figure><img class='strip' alt='traversal of {_e(lid)}' src='{strip}'>"
                      "<figcaption>traversal: one row per base (and clamp), one column per strength</figcaption></figure>")
    heat = _src(entry.get("heatmap"))
    if heat:
        images.append(f"<figure><img class='heat' alt='where {_e(lid)} changes the image' src='{heat}'>"
                      "<figcaption>where the image changes along the traversal; "
                      "where the score rises (green) and falls (red)</figcaption></figure>")
    return (
        f"<section class='latent {state}' id='latent-{_e(lid)}'><h2>{_e(lid)} {badges}</h2>{body}"
        f"<div class='meta'>{' · '.join(meta)}</div><div class='images'>{''.join(images)}</div>{_responses(entry)}</section>"
    )


def _name(value: Any) -> Any:
    return value.get("name") if isinstance(value, dict) else value


def _sum_timing(latents: list[dict[str, Any]], key: str) -> float | None:
    values = [_num((e.get("timing") or {}).get(key)) for e in latents if isinstance(e.get("timing"), dict)]
    values = [v for v in values if v is not None]
    return sum(values) if values else None


def _summary(data: dict[str, Any], latents: list[dict[str, Any]]) -> dict[str, Any]:
    states = [_state(e) for e in latents]
    adapter = data.get("adapter")
    backend = data.get("backend")
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    elapsed = _num(data.get("elapsed_s"))
    traverse, explain = _sum_timing(latents, "traverse_s"), _sum_timing(latents, "explain_s")
    times = [f"{elapsed:.1f} s total" if elapsed is not None else None,
             f"traversals {traverse:.1f} s" if traverse is not None else None,
             f"explanations {explain:.1f} s" if explain is not None else None]
    ranking = data.get("ranking") if isinstance(data.get("ranking"), dict) else None
    if ranking and _num(ranking.get("seconds")) is not None:
        times.append(f"ranking {ranking['seconds']:.1f} s")
    rank_text = None
    if ranking:
        delta = _num(ranking.get("delta"))
        rank_text = (f"{ranking.get('method')} of score {ranking.get('score')} over {ranking.get('n_inputs', '?')} inputs"
                     + (f", mean |convergence delta| {delta:.2g}" if delta is not None else ""))
    site = adapter.get("site") if isinstance(adapter, dict) else None
    model_of_backend = backend.get("model") if isinstance(backend, dict) else None
    return {
        "model": data.get("model"),
        "adapter": f"{_name(adapter)}" + (f" at {site}" if site else "") if adapter is not None else None,
        "backend": f"{_name(backend)}" + (f" ({model_of_backend})" if model_of_backend else "") if backend is not None else None,
        "bias": data.get("bias"),
        "certainty": (f"{settings.get('similarity')} similarity, {settings.get('samples')} answers per latent, "
                      f"threshold {settings.get('threshold')}") if settings.get("similarity") else None,
        "latents": (f"{len(latents)}: {states.count('clear')} clear, {states.count('unclear')} no clear explanation, "
                    f"{states.count('failed')} failed"),
        "ranking": rank_text,
        "status": data.get("status"),
        "time": ", ".join(t for t in times if t) or None,
    }


def render_report(data: dict[str, Any]) -> str:
    """The HTML text for a results.json object (every model- or backend-provided string escaped)."""
    latents = [e for e in data.get("latents", []) if isinstance(e, dict)]
    if latents and all(isinstance(e.get("rank"), int) for e in latents):
        latents = sorted(latents, key=lambda e: e["rank"])
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    threshold = _num(settings.get("threshold"))
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in _summary(data, latents).items() if v is not None)
    body = "".join(_latent(e, threshold) for e in latents) or "<p>No latents were explained.</p>"
    order = "in rank order (the score depends most on the first)" if latents and "rank" in latents[0] else "in latent order"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>latentexplainer report</title>"
        f"<style>{CSS}</style></head><body><h1>What the latents mean</h1><table class='summary'>{rows}</table>"
        f"<p class='meta'>Latents {order}. Certainty is the agreement of the sampled answers; below the threshold "
        f"(the tick on each bar) the latent has no clear explanation.</p>{body}</body></html>\n"
    )


def write_report(out_dir: str | Path, data: dict[str, Any]) -> Path:
    path = Path(out_dir) / "report.html"
    atomic_write_text(path, render_report(data))
    return path
