"""report.html: a self-contained page (strips and heat maps beside it, no network) built from results.json.

Every string that a model, a backend or a user provided (explanations, responses, errors, latent
ids, model names, factor names) is HTML-escaped; image paths are only used when they are plain
relative paths inside the run directory. The page has no script and loads nothing from the network.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from ..safe_io import atomic_write_text

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
.attr{font-size:.75em;font-weight:600;border-radius:8px;padding:0 6px;background:#e6eefc;color:#1d4f80}
.evidence{font-size:.9em;margin-top:6px;padding:4px 8px;border-radius:6px;background:#f3f7f3}
.evidence.bad{background:#f7f3ea}
.bar.small{width:90px;height:8px}
.bar.small span.fill{height:8px}
.evidence.bad .bar span.fill{background:#d9a400}
.unclear img.strip{max-width:360px;min-width:160px}
.unclear details,.unclear .meta{font-size:.85em}
table.latents{border-collapse:collapse;margin:1em 0;width:100%}
table.latents th,table.latents td{padding:3px 10px;border-bottom:1px solid #e3e3e3;text-align:left;vertical-align:top}
table.latents td.num{text-align:right;font-variant-numeric:tabular-nums}
table.latents .unclear,table.latents .failed{color:#7a5600;font-style:italic;border:none;background:none}
table.latents .failed{color:#8b1d1d}
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


def _examples(entry: dict[str, Any], threshold: float | None) -> str:
    """The example-evidence panel of an SAE feature: its explanation (or why none), certainty, the image."""
    record = entry.get("examples")
    if not isinstance(record, dict):
        return ""
    if record.get("status") == "failed":
        body = f"<div class='expl'>Examples: failed: {_e(record.get('error'))}</div>"
    elif record.get("clear") and record.get("explanation"):
        body = f"<div class='expl'>Examples: {_e(record.get('explanation'))}</div>"
    else:
        note = f" ({_e(record.get('note'))})" if record.get("note") else ""
        body = f"<div class='expl'>Examples: no clear explanation{note}.</div>"
    meta = []
    certainty = _num(record.get("certainty"))
    if certainty is not None:
        meta.append(_bar(certainty, threshold))
    for key, label in (("n_firing", "firing images"), ("n_not_firing", "not firing")):
        if _num(record.get(key)) is not None:
            meta.append(f"{int(record[key])} {label}")
    iou = _num(record.get("iou"))
    if iou is not None:
        meta.append(f"IoU vs object masks {iou:.2f}")
    image = _src(record.get("image"))
    figure = (f"<figure><img class='strip' alt='examples of {_e(entry.get('id'))}' src='{image}'><figcaption>where it "
              "fires (bright: where on the image), where it does not</figcaption></figure>") if image else ""
    return (f"<div class='examples'>{body}<div class='meta'>{' · '.join(meta)}</div>"
            f"<div class='images'>{figure}</div>{_responses(record)}</div>")


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
        attribute = r.get("attribute")
        named = f"<span class='attr' title='the attribute this answer names'>{_e(attribute)}</span> " if attribute else ""
        items.append(f"<li>{named}{_e(r.get('text'))}{tag}</li>")
    n = len(items)
    return f"<details><summary>{n} response{'s' if n != 1 else ''}</summary><ol>{''.join(items)}</ol></details>"


def _why_unclear(entry: dict[str, Any]) -> str:
    evidence = entry.get("evidence") if isinstance(entry.get("evidence"), dict) else None
    if evidence is None or evidence.get("consistent") is not False:
        return "the answers disagree or abstain"
    if evidence.get("visible") is False:
        return "the images do not change visibly"
    if str(evidence.get("reason", "")).startswith(("too few", "one strip")):
        return "too few strips to tell whether the images change consistently"
    return "the images change differently from base to base"


def _axes(entry: dict[str, Any], strengths: list[float] | None) -> str:
    lid = _e(entry.get("id"))
    values = f" from {strengths[0]:+g} to {strengths[-1]:+g}" if strengths else ""
    return (f"columns: {lid} moves{values} (strength on top); rows: one per base latent, and per value of the "
            "clamped latent where the bias compares two (labelled left)")


def _evidence(evidence: dict[str, Any] | None) -> str:
    """The image evidence: verdict, numbers and two small bars (change and agreement against their thresholds)."""
    if evidence is None:
        return ""
    from ..evidence import MIN_CHANGE, MIN_CONSISTENCY, MIN_RATIO, MIN_SIGNIFICANCE

    change, ratio = _num(evidence.get("change")), _num(evidence.get("ratio"))
    agreement, z = _num(evidence.get("consistency")), _num(evidence.get("significance"))
    strips = evidence.get("strips") if isinstance(evidence.get("strips"), int) else None
    verdict = "consistent" if evidence.get("consistent") else ("changes, but not consistently" if evidence.get("visible")
                                                                  else "no visible change")
    parts = [f"<b>images: {_e(verdict)}</b>"]
    if change is not None:
        # log scale: the floor at 1/4 of the bar, a change of 1 (black to white) fills it
        width = max(0.0, min(1.0, (math.log10(max(change, 1e-4)) + 4) / 4))
        floor = (math.log10(MIN_CHANGE) + 4) / 4
        parts.append(f"<span class='bar small' title='mean change per pixel, log scale; tick: floor {MIN_CHANGE:.4f}'>"
                     f"<span class='fill' style='width:{100 * width:.0f}%'></span>"
                     f"<span class='thr' style='left:{100 * floor:.0f}%'></span></span> change {change:.3f}"
                     + (f" ({ratio:.2f} of the variation between bases; needs {MIN_RATIO})" if ratio is not None else ""))
    if agreement is not None:
        width = max(0.0, min(1.0, agreement))
        parts.append(f"<span class='bar small' title='agreement across strips; tick: {MIN_CONSISTENCY}'>"
                     f"<span class='fill' style='width:{100 * width:.0f}%'></span>"
                     f"<span class='thr' style='left:{100 * MIN_CONSISTENCY:.0f}%'></span></span> agreement {agreement:.2f}"
                     + (f" over {strips} strips" if strips is not None else "")
                     + (f" (z {z:.1f}; needs {MIN_SIGNIFICANCE:g})" if z is not None else ""))
    state = "ok" if evidence.get("consistent") else "bad"
    return f"<div class='evidence {state}'>{' · '.join(parts)}<div class='tag'>{_e(evidence.get('reason'))}</div></div>"


def _latent(entry: dict[str, Any], threshold: float | None = None, strengths: list[float] | None = None) -> str:
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
        body = f"<div class='expl'>No clear explanation: {_e(_why_unclear(entry))}.</div>"
        label = "no clear explanation"
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
                      f"<figcaption>{_axes(entry, strengths)}</figcaption></figure>")
    evidence = entry.get("evidence") if isinstance(entry.get("evidence"), dict) else None
    heat = _src(entry.get("heatmap"))
    if heat and evidence is not None and evidence.get("visible") is False:
        heat = None  # nothing visibly changes: a heat map would only show amplified noise
        images.append("<p class='meta'>No heat map: the images do not change visibly.</p>")
    if heat:
        images.append(f"<figure><img class='heat' alt='where {_e(lid)} changes the image' src='{heat}'>"
                      "<figcaption>where the image changes along the traversal; "
                      "where the score rises (green) and falls (red)</figcaption></figure>")
    shown = f"<div class='images'>{''.join(images)}</div>"
    if state == "unclear" and images:  # compact: the card says why; the images are one click away
        shown = f"<details class='images-folded'><summary>traversal images</summary>{shown}</details>"
    return (
        f"<section class='latent {state}' id='latent-{_e(lid)}'><h2>{_e(lid)} {badges}</h2>{body}"
        f"<div class='meta'>{' · '.join(meta)}</div>{_evidence(evidence)}"
        f"{shown}{_responses(entry)}{_examples(entry, threshold)}</section>"
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
        "status": _status_text(data),
        "time": ", ".join(t for t in times if t) or None,
        "tokens": _usage_text(data.get("usage")),
    }


def _usage_text(usage: Any) -> str | None:
    """``1200 prompt + 340 completion tokens in 10 requests`` (None when no request was made)."""
    if not isinstance(usage, dict) or not isinstance(usage.get("requests"), int) or usage["requests"] <= 0:
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    return f"{prompt} prompt + {completion} completion tokens in {usage['requests']} requests"


def _status_text(data: dict[str, Any]) -> str | None:
    """``complete``, or e.g. ``incomplete: 2 ok, 1 failed`` (the counts results.json records)."""
    status, counts = data.get("status"), data.get("counts")
    if status is None or status == "complete" or not isinstance(counts, dict):
        return status
    parts = [f"{counts[k]} {k}" for k in ("ok", "failed", "skipped", "missing") if isinstance(counts.get(k), int) and counts[k]]
    return f"{status}: {', '.join(parts)}" if parts else status


def _latent_table(latents: list[dict[str, Any]]) -> str:
    """One line per latent: explanation (or why not), certainty, image evidence, captured factor."""
    if not latents:
        return ""
    has_factor = any(isinstance(e.get("factor"), dict) for e in latents)
    rows = []
    for e in latents:
        state = _state(e)
        if state == "clear":
            text = f"<td>{_e(e.get('explanation'))}</td>"
        elif state == "failed":
            error = str(e.get("error") or "")
            text = f"<td class='failed'>failed: {_e(error[:160] + ('…' if len(error) > 160 else ''))}</td>"
        else:
            text = f"<td class='unclear'>{'skipped' if state == 'skipped' else 'no clear explanation'}</td>"
        certainty = _num(e.get("certainty"))
        evidence = e.get("evidence") if isinstance(e.get("evidence"), dict) else None
        if evidence is None:
            images = ""
        else:
            verdict = "consistent" if evidence.get("consistent") else ("inconsistent" if evidence.get("visible") else "no change")
            agreement = _num(evidence.get("consistency"))
            images = verdict + (f" ({agreement:.2f})" if agreement is not None and evidence.get("visible") else "")
        factor = ""
        if has_factor and isinstance(e.get("factor"), dict):
            factor = _e(e["factor"].get("name") or "none")
        rows.append(f"<tr><td><a href='#latent-{_e(e.get('id'))}'>{_e(e.get('id'))}</a></td>{text}"
                    f"<td class='num'>{'' if certainty is None else f'{certainty:.2f}'}</td><td>{_e(images)}</td>"
                    + (f"<td>{factor}</td>" if has_factor else "") + "</tr>")
    head = ("<tr><th>latent</th><th>explanation</th><th>certainty</th><th>images</th>"
            + ("<th>factor</th>" if has_factor else "") + "</tr>")
    return f"<table class='latents'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def render_report(data: dict[str, Any]) -> str:
    """The HTML text for a results.json object (every model- or backend-provided string escaped)."""
    latents = [e for e in data.get("latents", []) if isinstance(e, dict)]
    if latents and all(isinstance(e.get("rank"), int) for e in latents):
        latents = sorted(latents, key=lambda e: e["rank"])
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    threshold = _num(settings.get("threshold"))
    strengths = settings.get("strengths")
    strengths = [float(s) for s in strengths] if isinstance(strengths, list) and strengths and all(
        _num(s) is not None for s in strengths) else None
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in _summary(data, latents).items() if v is not None)
    body = "".join(_latent(e, threshold, strengths) for e in latents) or "<p>No latents were explained.</p>"
    order = "in rank order (the score depends most on the first)" if latents and "rank" in latents[0] else "in latent order"
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>latentexplainer report</title>"
        f"<style>{CSS}</style></head><body><h1>What the latents mean</h1>{_latent_table(latents)}"
        f"<table class='summary'>{rows}</table>"
        f"<p class='meta'>Latents {order}. A latent has a clear explanation only when its images change visibly and "
        "consistently across bases (image evidence) and the sampled answers agree (certainty at or above the threshold, "
        f"the tick on each bar).</p>{body}</body></html>\n"
    )


def write_report(out_dir: str | Path, data: dict[str, Any]) -> Path:
    path = Path(out_dir) / "report.html"
    atomic_write_text(path, render_report(data))
    return path
