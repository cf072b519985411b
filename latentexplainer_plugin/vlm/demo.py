"""``latentexplainer demo-vlm``: the multimodal demo, offline, on the shipped demo VLM.

1. Caption accuracy per attribute on held-out images, against chance (:mod:`.evaluate`).
2. The three lenses per layer on the visual tokens of other held-out images, scored against the
   renderer's truth (:mod:`.lens_compare`), with a plot.
3. SAE features of a language-model layer at the image tokens (:mod:`.features`): which attribute
   each follows on held-out images, IoU of its activation masks against the object masks, and how
   steering it changes the VLM's captions.
4. ``results.json`` and ``report.html`` in the output directory (layout in docs/vlm.md, "demo-vlm").
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..data.shapes import make_dataset
from ..errors import VLMError
from ..safe_io import atomic_write_text
from .captions import caption_from_factors
from .evaluate import HELD_OUT_SEED, evaluate_demo_vlm
from .lens_compare import LENSES, compare_lenses

__all__ = ["DEMO_VLM_SCHEMA", "lens_figure", "run_demo_vlm"]

DEMO_VLM_SCHEMA = 1
LENS_SEED = HELD_OUT_SEED + 1  # lens images apart from the captioned ones
_NAMES = {"latentlens": "LatentLens", "embeddinglens": "EmbeddingLens", "logitlens": "LogitLens"}
_COLOURS = {"latentlens": "#22aa77", "embeddinglens": "#3377aa", "logitlens": "#dd9900"}


def lens_figure(lenses: dict[str, Any]) -> Any:
    """Object-patch hit rate per layer for the three lenses (``any`` solid, ``strict`` dashed), with chance."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.4), dpi=90)
    ax = fig.subplots()
    layers = [row["layer"] for row in lenses["layers"]]
    for lens in LENSES:
        for metric, style in (("any", "-"), ("strict", "--")):
            ax.plot(layers, [row["object"][lens][metric] for row in lenses["layers"]], style, marker="o",
                    color=_COLOURS[lens], label=f"{_NAMES[lens]} ({metric})")
    for metric, style in (("any", "-"), ("strict", "--")):
        ax.axhline(lenses["chance"]["object"][metric], color="#999999", linestyle=style, linewidth=1,
                   label=f"chance ({metric})")
    ax.set_xticks(layers)
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("object patches naming a true attribute")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    return fig


def _table(lenses: dict[str, Any], part: str) -> str:
    head = "".join(f"<th>{_NAMES[lens]} any</th><th>{_NAMES[lens]} strict</th>" for lens in LENSES)
    rows = []
    for row in lenses["layers"]:
        cells = "".join(f"<td>{row[part][lens]['any']:.3f}</td><td>{row[part][lens]['strict']:.3f}</td>" for lens in LENSES)
        rows.append(f"<tr><td>{row['layer']}</td>{cells}</tr>")
    chance = lenses["chance"][part]
    rows.append(f"<tr><td>chance</td><td colspan='{2 * len(LENSES)}'>any {chance['any']:.3f}, "
                f"strict {chance['strict']:.3f}</td></tr>")
    return f"<table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>"


def _features_html(features: dict[str, Any] | None) -> str:
    if not features:
        return ""
    s = features["summary"]
    sae = features["sae"]
    rows = []
    for r in features["features"]:
        if r["dead"]:
            continue
        eta = max(r["eta2"].values())
        steer = r["steering"]
        rows.append(f"<tr><td>f{r['feature']}</td><td>{r['frequency']:.2f}</td><td>{'dense' if r['dense'] else ''}</td>"
                    f"<td>{html.escape(r['follows'] or '-')}</td><td>{eta:.2f}</td>"
                    f"<td>{'' if r['iou'] is None else format(r['iou'], '.2f')}</td>"
                    f"<td>{r['mean_on_object']:.3f} / {r['mean_on_background']:.3f}</td>"
                    f"<td>{html.escape(steer['most_changed'] or '-')} "
                    f"({max(steer['changes'].values()):.2f})</td>"
                    f"<td>{html.escape(r['examples']['explanation'] or 'no clear explanation')}</td>"
                    + (f"<td>{html.escape(r['self_examples']['explanation'] or 'no clear explanation')}</td>"
                       if "self_examples" in r else "") + "</tr>")
    follows = ", ".join(f"{a} {n}" for a, n in s["follows"].items() if n)
    own = "self_examples_clear_among_followers" in s
    own_text = (f""" Explained by the VLM itself from the same examples (its captions of firing vs non-firing images):
{s['self_examples_clear_among_followers']} of the followers are clear, {s['self_examples_naming_the_followed_attribute']} of
those name the followed attribute; {s['self_examples_clear_among_non_followers']} non-followers are clear;
{s['self_and_offline_agree']} features are clear for both explainers on a common attribute.""" if own else "")
    return f"""<h2>SAE features at {html.escape(sae['site'])} (image tokens)</h2>
<p>TopK SAE, {sae['d_sae']} features, k={sae['k']}, {sae['steps']} steps on {sae['train_images']} training images:
FVU {sae['training'].get('fvu', float('nan')):.4f}. Held-out ({features['held_out']['n']} images): {s['live']} live,
{s['dead']} dead, {s['dense']} dense; {s['follow_an_attribute']} follow an attribute (eta&sup2; &ge;
{features['follow_eta2']}: {html.escape(follows or 'none')}); steering changes the followed attribute most for
{s['steering_changes_the_followed_attribute']}; {s['followers_firing_more_on_object']} of those following an attribute fire more on
object patches than on background patches; IoU of activation masks vs object masks: median
{s['iou_median'] if s['iou_median'] is not None else 'n/a'}, {s['iou_over_0_5']} features above 0.5. Explained from
their examples: {s['examples_clear_among_followers']} of the features that follow an attribute are clear, and
{s['examples_naming_the_followed_attribute']} of those name it; {s['examples_clear_among_non_followers']} features
that follow no attribute are clear.{own_text}</p>
<table><tr><th>feature</th><th>frequency</th><th></th><th>follows</th><th>eta&sup2;</th><th>IoU</th>
<th>mean on object / background patches</th>
<th>steering changes most (share of captions)</th><th>explained from its examples (offline)</th>
{'<th>explained by the VLM itself (captions)</th>' if own else ''}</tr>{''.join(rows)}</table>"""


def _report(data: dict[str, Any]) -> str:
    acc = data["captions"]["accuracy"]
    cap_rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{r['accuracy']:.3f}</td><td>{r['chance']:.3f}</td></tr>"
                       for a, r in acc.items())
    examples = "".join(f"<li>{html.escape(e['caption'])} <small>(truth: {html.escape(e['truth'])})</small></li>"
                       for e in data["captions"]["examples"])
    lenses = data["lenses"]
    c = lenses["counts"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>latentexplainer demo-vlm</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>The demo VLM, explained offline</h1>
<h2>Caption accuracy ({data['captions']['held_out']['n']} held-out images)</h2>
<table><tr><th>attribute</th><th>accuracy</th><th>chance</th></tr>{cap_rows}</table><ul>{examples}</ul>
<h2>Lenses for visual tokens</h2>
<p>{c['images']} held-out images, {c['object_patches']} object patches, {c['background_patches']} background
patches; bank: {c['bank_contexts']} contexts of {c['bank_words']} words at layers {c['bank_layers']}; top-{lenses['top_k']}.
<em>any</em>: a true word among the top-k; <em>strict</em>: exactly one word of an attribute, and it is true.</p>
<img src="{html.escape(data['lenses']['plot'])}" alt="hit rate per layer">
<h3>Object patches</h3>{_table(lenses, 'object')}
<h3>Background patches</h3>{_table(lenses, 'background')}
{_features_html(data.get('features'))}
<p><small>{data['seconds']:.0f} s</small></p></body></html>
"""


def run_demo_vlm(out: str | Path, *, model_dir: str | Path | None = None, caption_images: int = 200,
                 lens_images: int = 100, bank_captions: int = 1000, top_k: int = 5,
                 max_contexts_per_token: int = 50, sae_features: int = 64, sae_steps: int = 400,
                 feature_train_images: int = 600, feature_images: int = 200, feature_layer: int = 0,
                 self_explain: bool = True) -> dict[str, Any]:
    """Run the multimodal demo and write ``results.json``, ``lenses.png`` and ``report.html`` to ``out``.

    ``model_dir``: a demo-VLM directory (default: the shipped weights). Sizes: held-out images
    captioned (``caption_images``) and read by the lenses (``lens_images``), training captions in the
    contextual bank (``bank_captions``). SAE features: ``sae_features`` (0: skip the section) trained for
    ``sae_steps`` on ``feature_train_images`` at decoder layer ``feature_layer``, read on
    ``feature_images`` held-out images; with ``self_explain`` the demo VLM also explains its own features
    from their examples (by captions, next to the offline contrastive explainer)."""
    for name, value in (("caption_images", caption_images), ("lens_images", lens_images),
                        ("bank_captions", bank_captions), ("top_k", top_k),
                        ("max_contexts_per_token", max_contexts_per_token), ("sae_steps", sae_steps),
                        ("feature_train_images", feature_train_images), ("feature_images", feature_images)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise VLMError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(sae_features, int) or isinstance(sae_features, bool) or sae_features < 0:
        raise VLMError(f"sae_features must be an integer >= 0 (0: no SAE section), got {sae_features!r}")
    from . import WEIGHTS_DIR
    from .build import load_demo_vlm

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load_demo_vlm(model_dir or WEIGHTS_DIR)
    captions = evaluate_demo_vlm(model, processor, n=caption_images)
    corpus = caption_from_factors(make_dataset(bank_captions, seed=0)["factors"])
    held = make_dataset(lens_images, seed=LENS_SEED, masks=True)
    lenses = compare_lenses(model, processor, corpus, held["images"], held["masks"], held["factors"], top_k=top_k,
                            max_contexts_per_token=max_contexts_per_token)
    lenses["held_out"] = {"n": lens_images, "seed": LENS_SEED}
    lenses["plot"] = "lenses.png"
    lens_figure(lenses).savefig(out / "lenses.png")
    data = {"schema": DEMO_VLM_SCHEMA, "kind": "demo-vlm", "model": str(model_dir or "shipped demo VLM"),
            "captions": captions, "lenses": lenses, "features": None}
    if sae_features:
        import tempfile

        from .features import vlm_sae_features

        with tempfile.TemporaryDirectory(prefix="demo-vlm-sae-") as work:
            features = vlm_sae_features(model, processor, work, layer=feature_layer, train_images=feature_train_images,
                                        held_images=feature_images, d_sae=sae_features, steps=sae_steps,
                                        self_explain=self_explain)
            shutil.copytree(Path(work) / "sae", out / "sae", dirs_exist_ok=True)  # SAELens layout
        features["sae"]["path"] = "sae"
        features["sae"]["training"] = {key: v for key, v in features["sae"]["training"].items()
                                       if key not in ("dead", "dense")}  # the lists are per feature below
        data["features"] = features
    data["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out / "results.json", json.dumps(data, indent=2, allow_nan=False))
    atomic_write_text(out / "report.html", _report(data))
    return data
