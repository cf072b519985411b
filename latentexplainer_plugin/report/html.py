"""report.html: a self-contained page (strips beside it, no network) built from results.json."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..store import atomic_write_text

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table.summary td{padding:2px 10px 2px 0}
.latent{border:1px solid #ddd;border-radius:6px;padding:12px;margin:14px 0}
.latent h2{margin:0 0 6px 0;font-size:1.1em}
.clear .expl{font-size:1.05em}
.unclear .expl{color:#8a5a00;font-style:italic}
.failed{border-color:#c33;background:#fff5f5}
.bar{display:inline-block;width:160px;height:10px;background:#eee;border-radius:5px;vertical-align:middle}
.bar span{display:block;height:10px;border-radius:5px;background:#2a7}
.unclear .bar span{background:#d90}
.meta{color:#555;font-size:.9em}
img.strip{max-width:100%;image-rendering:pixelated;margin-top:6px}
details{margin-top:6px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _factor(entry: dict[str, Any]) -> str:
    factor = entry.get("factor")
    if not isinstance(factor, dict):
        return ""
    name = factor.get("name") or "none"
    return f" · captures <b>{_e(name)}</b> ({_e(factor.get('metric', 'score'))} {float(factor.get('score', 0)):.2f})"


def _latent(entry: dict[str, Any]) -> str:
    status = entry.get("status")
    clear = bool(entry.get("clear")) and status == "ok"
    cls = "failed" if status == "failed" else ("clear" if clear else "unclear")
    certainty = entry.get("certainty")
    if status == "failed":
        body = f"<div class='expl'>failed: {_e(entry.get('error'))}</div>"
    elif clear:
        body = f"<div class='expl'>{_e(entry.get('explanation'))}</div>"
    else:
        body = "<div class='expl'>no clear explanation</div>"
    bar = ""
    if isinstance(certainty, (int, float)):
        bar = (f"<span class='bar' title='certainty {certainty:.2f}'><span style='width:{100 * max(0.0, min(1.0, certainty)):.0f}%'>"
               f"</span></span> certainty {certainty:.2f}")
    meta = []
    if isinstance(entry.get("kl"), (int, float)):
        meta.append(f"KL {entry['kl']:.2f}" + (" (collapsed)" if entry.get("active") is False else ""))
    if "attribution" in entry and isinstance(entry["attribution"], (int, float)):
        meta.append(f"attribution {entry['attribution']:.3g} (rank {_e(entry.get('rank'))})")
    responses = "".join(
        f"<li>{_e(r.get('text')) if r.get('text') is not None else '<i>failed: ' + _e(r.get('error')) + '</i>'}"
        f"{' <i>(abstains)</i>' if r.get('abstained') else ''}</li>"
        for r in entry.get("responses", [])
    )
    strip = f"<img class='strip' alt='traversal of {_e(entry.get('id'))}' src='{_e(entry['strip'])}'>" if entry.get("strip") else ""
    heat = f"<img class='strip' alt='change map' src='{_e(entry['heatmap'])}'>" if entry.get("heatmap") else ""
    return (
        f"<section class='latent {cls}' id='{_e(entry.get('id'))}'><h2>{_e(entry.get('id'))}</h2>{body}"
        f"<div class='meta'>{bar} {' · '.join(_e(m) for m in meta)}{_factor(entry)}</div>{strip}{heat}"
        f"<details><summary>{len(entry.get('responses', []))} responses</summary><ol>{responses}</ol></details></section>"
    )


def render_report(data: dict[str, Any]) -> str:
    """The HTML text for a results.json object (every model- or backend-provided string escaped)."""
    latents = data.get("latents", [])
    n_clear = sum(1 for e in latents if e.get("clear"))
    n_failed = sum(1 for e in latents if e.get("status") == "failed")
    summary = {
        "model": data.get("model"),
        "adapter": (data.get("adapter") or {}).get("name") if isinstance(data.get("adapter"), dict) else data.get("adapter"),
        "backend": (data.get("backend") or {}).get("name") if isinstance(data.get("backend"), dict) else data.get("backend"),
        "bias": data.get("bias"),
        "similarity": (data.get("settings") or {}).get("similarity"),
        "latents": f"{len(latents)} ({n_clear} clear, {n_failed} failed)",
        "status": data.get("status"),
        "time": f"{data['elapsed_s']:.1f} s" if isinstance(data.get("elapsed_s"), (int, float)) else None,
    }
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary.items() if v is not None)
    body = "".join(_latent(e) for e in latents)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>latentexplainer report</title>"
        f"<style>{CSS}</style></head><body><h1>What the latents mean</h1><table class='summary'>{rows}</table>{body}"
    )


def write_report(out_dir: str | Path, data: dict[str, Any]) -> Path:
    path = Path(out_dir) / "report.html"
    atomic_write_text(path, render_report(data))
    return path
