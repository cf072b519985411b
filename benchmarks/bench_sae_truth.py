"""Do explained SAE features name the factor they follow? A truth check on the demo VAE (issue 13).

1. Train a TopK SAE on the demo VAE's decoder activations at ``--site`` (decoded prior samples, the
   ``latentexplainer sae-train`` path).
2. Ground truth per feature: its activation on held-out demo images (encoder means -> decoder -> SAE)
   against the 7 factors; a live feature "follows" the factor with the highest normalised mutual
   information when it reaches 0.1 (``models.factors.captured_factors``, as for latents).
3. Explain every feature from steering traversals with the offline explainer (``combination`` bias),
   judge each clear explanation (``evaluation.judge.FactorJudge``) and count how often it names the
   factor the feature follows.

Prints the counts and a per-feature table. Run: ``nice -n 10 python benchmarks/bench_sae_truth.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="decoder.fc.1.output")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from latentexplainer_plugin import LatentExplainer
    from latentexplainer_plugin.adapters.vae import VAEAdapter
    from latentexplainer_plugin.demo import demo_data, load_demo_model
    from latentexplainer_plugin.evaluation.judge import FactorJudge
    from latentexplainer_plugin.hooks.sites import site_activation
    from latentexplainer_plugin.models.factors import captured_factors
    from latentexplainer_plugin.models.statistics import encode_means
    from latentexplainer_plugin.sae import SAEFeatureAdapter
    from latentexplainer_plugin.sae.collect import collect_activations
    from latentexplainer_plugin.sae.train import train_sae
    from latentexplainer_plugin.types import Site

    started = time.perf_counter()
    model = load_demo_model()
    inner = VAEAdapter(model)
    site = Site.parse(args.site)
    with tempfile.TemporaryDirectory() as tmp:
        bases = inner.sample_bases(args.samples, seed=0)
        collect_activations(inner.driver, site, [bases[i:i + 512] for i in range(0, len(bases), 512)], Path(tmp) / "acts")
        sae, report = train_sae(Path(tmp) / "acts", args.features, args.k, args.steps, seed=0, site=str(site))
    print(f"SAE {report.d_in} -> {report.d_sae}, k={report.k}: FVU {report.metrics.get('fvu'):.4f}, "
          f"L0 {report.metrics.get('l0'):.2f}, dead {report.metrics.get('n_dead')}, dense {report.metrics.get('n_dense')}")

    data = demo_data(args.eval_images)
    names = [str(n) for n in data["factor_names"]]
    z = torch.from_numpy(encode_means(model, data["images"])).float()
    with torch.no_grad():
        acts = sae.encode(torch.cat([site_activation(inner.driver, site, z[i:i + 512]) for i in range(0, len(z), 512)]))
    acts = acts.flatten(1).numpy() if acts.ndim == 2 else acts.mean(dim=tuple(range(2, acts.ndim))).numpy()
    alive = (acts > 0).any(0)
    follows = captured_factors(acts, data["factors"], names)

    adapter = SAEFeatureAdapter(inner, sae, site=site)
    results = LatentExplainer(adapter, backend="offline", bias="combination").attribute()
    judge = FactorJudge(names)
    clear = [r for r in results if r.clear]
    verdicts = dict(zip([r.id for r in clear], judge.judge_many([r.explanation for r in clear])))

    rows, counts = [], {"dead (on data)": 0, "live": 0, "follow a factor": 0, "clear among those": 0,
                        "clear and name it": 0, "clear among live non-followers": 0, "clear among dead": 0}
    for i, r in enumerate(results):
        k = adapter.features[r.index]
        factor = follows[k].factor if alive[k] else None
        counts["dead (on data)" if not alive[k] else "live"] += 1
        if factor is not None:
            counts["follow a factor"] += 1
            counts["clear among those"] += r.clear
            counts["clear and name it"] += bool(r.clear and verdicts[r.id].names(factor))
        elif alive[k]:
            counts["clear among live non-followers"] += r.clear
        else:
            counts["clear among dead"] += r.clear
        judged = verdicts[r.id].factor if r.id in verdicts else "-"
        rows.append(f"{r.id:>4}  alive {str(bool(alive[k])):5}  follows {str(factor):13} nmi {follows[k].score:.2f}  "
                    f"clear {str(r.clear):5}  judged {judged:13}  {r.explanation or ''}")
    print("\n".join(rows))
    for key, value in counts.items():
        print(f"{key}: {value}")
    if counts["clear among those"]:
        print(f"named right among clear factor-followers: {counts['clear and name it'] / counts['clear among those']:.2f}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
