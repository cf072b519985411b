"""The SAE demo, offline: an SAE trained here on the demo VAE's decoder, its features explained from
both kinds of evidence and judged against the data's ground-truth factors.

1. Train: the demo's training images (``make_dataset(train_images, seed=DEMO_SEED)``) are encoded to
   their encoder means, decoded up to ``site`` (a hidden layer of the decoder) and the activations
   there train a TopK SAE with eai-sparsify (:mod:`latentexplainer_plugin.sae.train`).
2. Evidence: held-out images with object masks (seed ``DEMO_EVAL_SEED``) give every feature its
   example set and its statistics (dead, dense, frequency: from the data); each feature is explained
   from a steering traversal and from its examples (offline backend, contrastive mode).
3. Ground truth, from the data's factors (not from image measurements): a live feature *follows*
   the factor that best separates the held-out images where it fires (anywhere) from the others,
   when that separation reaches 0.5: |Cliff's delta| of the factor (AUC >= 0.75), or for the
   categorical ``shape`` the total variation distance of the shape shares. (Normalised mutual
   information, used for the latents, caps out low for sparse features: a feature firing on 20 %
   of images carries at most H(0.2) = 0.5 nats about any factor.)
4. Judge: a clear example explanation *names* the factor when one of its structured claims is that
   factor's attribute (x_position: horizontal position, y_position: vertical position, scale: size,
   rotation: orientation, hue: colour, background: background brightness, shape: shape).

Writes the run directory (results.json, strips, examples, report.html), the SAE (``sae/``, SAELens
layout) and ``sae_demo.json`` (the counts), and prints the counts. A clear example explanation is
counted against the feature's best factor and, separately, against any factor it follows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation.named import named_factors

DEFAULT_SITE = "decoder.fc.1.output"
FOLLOWS_SEPARATION = 0.5  # |Cliff's delta| of a factor between firing and other images (AUC >= 0.75)


def feature_truth(adapter: Any, images: np.ndarray, factors: np.ndarray, names: list[str],
                  min_separation: float = FOLLOWS_SEPARATION, min_items: int = 10) -> list[dict[str, Any]]:
    """Per explained feature, on ``images`` (step 3): ``factor`` (the best-separating factor, None
    when none reaches ``min_separation`` or either side has fewer than ``min_items`` images), its
    ``score``, and ``followed``: every factor that reaches ``min_separation`` (a feature firing on a
    conjunction, e.g. large objects on the right, follows more than one)."""
    from ..backends.offline import cliffs_delta
    from ..hooks.sites import site_activation
    from ..models.statistics import encode_means

    z = torch.from_numpy(encode_means(adapter.inner.model, images)).float()
    picked = torch.tensor(adapter.features)
    rows = []
    with torch.no_grad():
        for i in range(0, len(z), 512):
            h = site_activation(adapter.inner.driver, adapter.site, z[i:i + 512])
            axis = adapter.sae.axis_for(h.ndim, adapter.feature_axis)
            f = adapter.sae.encode_last(h.movedim(axis, -1)).index_select(-1, picked)
            rows.append(f.reshape(len(h), -1, len(picked)).amax(1))
    fires = (torch.cat(rows) > 0).numpy()
    out = []
    for j in range(fires.shape[1]):
        on = fires[:, j]
        if on.sum() < min_items or (~on).sum() < min_items:
            out.append({"factor": None, "score": 0.0, "followed": []})
            continue
        scores = []
        for c, name in enumerate(names):
            col = factors[:, c]
            if name == "shape":  # categorical: total variation distance between the shape shares
                levels = np.unique(col)
                share = lambda m: np.array([(col[m] == v).mean() for v in levels])  # noqa: E731
                scores.append(0.5 * float(np.abs(share(on) - share(~on)).sum()))
            else:
                scores.append(abs(cliffs_delta(torch.from_numpy(col[on]), torch.from_numpy(col[~on]))))
        best = int(np.argmax(scores))
        out.append({"factor": names[best] if scores[best] >= min_separation else None, "score": round(scores[best], 4),
                    "followed": [n for n, v in zip(names, scores) if v >= min_separation]})
    return out


def run_demo_sae(out: str | Path, *, site: str = DEFAULT_SITE, n_features: int = 64, k: int = 4, steps: int = 2000,
                 train_images: int = 8192, eval_images: int = 2000, samples: int = 5, seed: int = 0,
                 progress: bool = False, force: bool = False) -> dict[str, Any]:
    """Run the whole demo (module docstring) into ``out``; returns the counts written to ``sae_demo.json``.

    ``force``: overwrite a run directory made with other settings (else that is refused)."""
    import tempfile

    from ..adapters.vae import VAEAdapter
    from ..attribution import LatentExplainer
    from ..data.shapes import make_dataset
    from ..demo import DEMO_EVAL_SEED, DEMO_SEED, load_demo_model
    from ..models.statistics import encode_means
    from ..report.examples import ExamplesWriter
    from ..run import explain_to_dir
    from ..sae import SAEFeatureAdapter
    from ..sae.collect import collect_activations
    from ..sae.train import train_sae
    from ..types import Site

    started = time.perf_counter()
    out = Path(out)
    model = load_demo_model()
    inner = VAEAdapter(model)
    where = Site.parse(site)
    # 1. train on the demo's training images, encoded
    train = make_dataset(train_images, seed=DEMO_SEED)
    z = torch.from_numpy(encode_means(model, train["images"])).float()
    with tempfile.TemporaryDirectory(prefix="latentexplainer-sae-demo-") as tmp:
        collect_activations(inner.driver, where, [z[i:i + 512] for i in range(0, len(z), 512)], Path(tmp) / "acts")
        sae, report = train_sae(Path(tmp) / "acts", n_features, k, steps, seed=seed, site=str(where), out_dir=out / "sae")
    t_train = time.perf_counter() - started
    # 2. both kinds of evidence on held-out images
    data = make_dataset(eval_images, seed=DEMO_EVAL_SEED, masks=True)
    names = [str(n) for n in data["factor_names"]]
    adapter = SAEFeatureAdapter(inner, sae, site=where)
    adapter.attach_examples(data["images"], masks=data["masks"])
    truth = feature_truth(adapter, data["images"], data["factors"], names)  # 3.
    writer = ExamplesWriter(out)

    def extras(result: Any) -> dict[str, Any]:
        return adapter.latent_extras(result.index) | writer(result) | {"follows": truth[result.index]}

    explainer = LatentExplainer(adapter, backend="offline", samples=samples, seed=seed)
    data_out = explain_to_dir(explainer, out, header={"model": "latentexplainer demo VAE + SAE trained here",
                                                      "sae_demo": {"site": str(where), "n_features": n_features, "k": k}},
                              force=force, progress=progress, extras=extras)
    # 4. judge
    counts = {"features": 0, "dead": 0, "dense": 0, "live": 0, "follow a factor": 0, "examples clear among those": 0,
              "examples clear and name it": 0, "examples clear and name a followed factor": 0,
              "steering clear among those": 0, "examples clear among non-followers": 0,
              "examples clear among dead": 0, "steering clear among dead": 0}
    per_feature = []
    for entry in data_out["latents"]:
        counts["features"] += 1
        record = entry.get("examples") or {}
        follows = entry.get("follows") or {}
        dead, factor, followed = bool(entry.get("dead")), follows.get("factor"), set(follows.get("followed") or [])
        counts["dense"] += bool(entry.get("dense"))
        named = named_factors(record)
        if dead:
            counts["dead"] += 1
            counts["examples clear among dead"] += bool(record.get("clear"))
            counts["steering clear among dead"] += bool(entry.get("clear"))
        else:
            counts["live"] += 1
            if factor is not None:
                counts["follow a factor"] += 1
                counts["examples clear among those"] += bool(record.get("clear"))
                counts["examples clear and name it"] += bool(record.get("clear") and factor in named)
                counts["examples clear and name a followed factor"] += bool(record.get("clear") and named & followed)
                counts["steering clear among those"] += bool(entry.get("clear"))
            else:
                counts["examples clear among non-followers"] += bool(record.get("clear"))
        per_feature.append({"id": entry["id"], "dead": dead, "follows": factor, "examples": record.get("explanation"),
                            "named": sorted(n for n in named if n), "steering": entry.get("explanation")})
    clear = counts["examples clear among those"]
    summary = {"site": str(where), "n_features": n_features, "k": k, "steps": steps, "train_images": train_images,
               "eval_images": eval_images, "fvu": report.metrics.get("fvu"), "l0": report.metrics.get("l0"),
               "counts": counts, "named_share": round(counts["examples clear and name it"] / clear, 4) if clear else None,
               "named_followed_share": (round(counts["examples clear and name a followed factor"] / clear, 4)
                                        if clear else None),
               "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - started, 1), "features": per_feature}
    (out / "sae_demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """The counts of :func:`run_demo_sae`, one per line."""
    print(f"SAE at {summary['site']}: {summary['n_features']} features, k={summary['k']}, FVU {summary['fvu']:.4f}, "
          f"L0 {summary['l0']:.2f} (trained in {summary['train_s']:.0f} s)")
    for f in summary["features"]:
        if f["examples"] or f["follows"]:
            print(f"  {f['id']:>4}  follows {str(f['follows']):12}  examples: {f['examples'] or 'no clear explanation'}")
    for key, value in summary["counts"].items():
        print(f"{key}: {value}")
    share = summary["named_share"]
    print("clear example explanations of factor-following live features that name its best factor: "
          + (f"{share:.0%}" if share is not None else "none clear") + "; that name a factor it follows: "
          + (f"{summary['named_followed_share']:.0%}" if share is not None else "none clear")
          + f"; {summary['total_s']:.0f} s in all")


__all__ = ["DEFAULT_SITE", "FOLLOWS_SEPARATION", "feature_truth", "print_summary", "run_demo_sae"]
