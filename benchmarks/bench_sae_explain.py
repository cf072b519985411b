"""Explaining SAE features at scale: features explained per minute and peak memory (issue 13, item 7).

The demo VAE's decoder site ``decoder.deconv.0.input`` (64 channels, 4 x 4 positions per image).
A collection of N activation rows comes from N / 16 prior latents (seed 0) decoded up to the site;
item i's image is the decoder's image of latent i. For each (F features, N rows) a fresh process:

1. builds a random-init TopK SAE (F features, k=8; unit-norm random decoder rows, encoder = decoder
   transposed, b_dec = the collection's mean row so that TopK does not pick the same features
   everywhere); not trained: the point is the cost, not the explanations;
2. ``attach_examples`` (store given, 10 top + 10 quantile + 20 inactive examples per feature): the
   example index over all F features, one streamed pass (timed apart: "index s");
3. explains the first sampled feature once (warm-up: one-time costs, not counted), then a fixed sample of ``--sample`` features (evenly spaced over the F) with the offline
   backend, 5 samples, both kinds of evidence (steering traversal + example set), written per
   feature with ``explain_to_dir`` as the CLI does; the example maps are read ``--block`` (64)
   features per pass over the store (``--block 1``: one pass per feature, the unbatched path).

It prints the measured per-feature time of the sample as features explained per minute, the run
time extrapolated to all F features (index + F x per-feature; only the per-feature part is
extrapolated), features per minute of CPU time (process_time: less
sensitive to other jobs on a shared machine), and the process's peak RSS (VmHWM) and its rise
over the RSS before step 1. The mean seconds per feature of each part (traverse, explain, select,
examples) go to stderr as JSON.
One torch thread.

    nice -n 10 python benchmarks/bench_sae_explain.py [--features 256 1024 4096] [--rows 10000 100000] [--sample 64]
        [--block 64]

``--maps ROWS SHARD_ROWS`` only times the activation maps of 64 features' examples (CPU s), one pass
over the store per feature against one pass for all 64, on a collection of ROWS rows in shards of
SHARD_ROWS, for each ``--features``:

    nice -n 10 python benchmarks/bench_sae_explain.py --maps 1000000 16384 --features 1024 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_sae import _rss_mb  # this process's resident / peak memory (VmRSS / VmHWM)

SITE, K, BLOCK = "decoder.deconv.0.input", 8, 64


def _adapter_parts():
    import torch

    from latentexplainer_plugin.adapters import VAEAdapter
    from latentexplainer_plugin.demo import load_demo_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return VAEAdapter(load_demo_model().eval())


def make_collection(directory: Path, rows: int) -> None:
    """N / 16 prior latents through the decoder: the activations at SITE and the decoded images (images.npy)."""
    import numpy as np
    import torch

    from latentexplainer_plugin.sae.collect import collect_activations
    from latentexplainer_plugin.types import Site

    inner = _adapter_parts()
    items = rows // 16
    z = inner.sample_bases(items, seed=0)
    directory.mkdir(parents=True)
    collect_activations(inner.driver, Site.parse(SITE), [z[i:i + 500] for i in range(0, items, 500)], directory / "acts")
    with torch.no_grad():
        images = torch.cat([inner.model.decoder(z[i:i + 500]) for i in range(0, items, 500)])
    np.save(directory / "images.npy", (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())


def run_one(directory: str, features: int, sample: int, block: int = BLOCK) -> dict:
    import numpy as np
    import torch

    from latentexplainer_plugin.attribution import LatentExplainer
    from latentexplainer_plugin.report.examples import ExamplesWriter
    from latentexplainer_plugin.run import explain_to_dir
    from latentexplainer_plugin.sae import SAEFeatureAdapter, SparseAutoencoder
    from latentexplainer_plugin.sae.collect import ActivationStore

    inner = _adapter_parts()
    store = ActivationStore(Path(directory) / "acts")
    images = np.load(Path(directory) / "images.npy")
    mean = torch.zeros(store.d_in, dtype=torch.float64)
    for part in store.iter_shards(("activations",)):
        mean += part["activations"].double().sum(0)
    mean = (mean / len(store)).float()
    before = _rss_mb()
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(features, store.d_in, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(w_dec.T.contiguous(), torch.zeros(features), w_dec, mean, "topk", k=K)
    picked = sorted({round(i * (features - 1) / max(1, sample - 1)) for i in range(sample)})
    adapter = SAEFeatureAdapter(inner, sae, site=SITE, features=picked)
    t0, c0 = time.perf_counter(), time.process_time()
    adapter.attach_examples(images, store=store, n_top=10, n_quantiles=10, n_contrast=20, block=block)
    t_index, c_index = time.perf_counter() - t0, time.process_time() - c0
    explainer = LatentExplainer(adapter, samples=5)
    with tempfile.TemporaryDirectory() as out:  # one-time costs (first traversal, first selection) kept apart
        t1 = time.perf_counter()
        explain_to_dir(explainer, out, target=[0], extras=ExamplesWriter(out), progress=False)
        t_warm = time.perf_counter() - t1
    with tempfile.TemporaryDirectory() as out:
        t1, c1 = time.perf_counter(), time.process_time()
        results = explain_to_dir(explainer, out, extras=ExamplesWriter(out), progress=False)
        t_explain, c_explain = time.perf_counter() - t1, time.process_time() - c1
    per_feature, cpu_per_feature = t_explain / len(picked), c_explain / len(picked)
    peak = _rss_mb("VmHWM")
    records = [e.get("examples") or {} for e in results["latents"]]
    return {"features": features, "rows": len(store), "items": store.manifest.n_items, "sample": len(picked), "block": block,
            "index_s": round(t_index, 2), "warm_up_s": round(t_warm, 2), "explain_s": round(t_explain, 2), "per_feature_s": round(per_feature, 4),
            "features_per_min": round(60 / per_feature), "all_features_min": round((t_index + features * per_feature) / 60, 1),
            "index_cpu_s": round(c_index, 2), "cpu_per_feature_s": round(cpu_per_feature, 4),
            "features_per_cpu_min": round(60 / cpu_per_feature),
            "peak_rss_mb": round(peak), "peak_over_before_mb": round(peak - before),
            "examples_ok": sum(r.get("status") == "ok" for r in records), "dead": len(adapter.dead_latents()),
            "clear_steering": sum(bool(e.get("clear")) for e in results["latents"]),
            "clear_examples": sum(bool(r.get("clear")) for r in records),
            "parts_s": {k: round(sum((e.get("timing") or {}).get(k, 0.0) for e in results["latents"]) / len(picked), 4)
                        for k in ("traverse_s", "explain_s", "select_s", "examples_s")}}


def run_maps(rows: int, shard_rows: int, features: list[int]) -> None:
    """CPU time of the activation maps of 64 features' examples: one pass per feature against one pass for all."""
    import torch

    from latentexplainer_plugin.sae import SparseAutoencoder
    from latentexplainer_plugin.sae.collect import ActivationStore, collect_activations
    from latentexplainer_plugin.sae.examples import example_set, example_sets, index_examples
    from latentexplainer_plugin.types import Site

    inner = _adapter_parts()
    with tempfile.TemporaryDirectory() as tmp:
        z = inner.sample_bases(rows // 16, seed=0)
        collect_activations(inner.driver, Site.parse(SITE), [z[i:i + 500] for i in range(0, len(z), 500)], Path(tmp) / "acts",
                            shard_rows=shard_rows)
        store = ActivationStore(Path(tmp) / "acts")
        for f in features:
            g = torch.Generator().manual_seed(1)
            w = torch.randn(f, store.d_in, generator=g)
            w = w / w.norm(dim=1, keepdim=True)
            sae = SparseAutoencoder(w.T.contiguous(), torch.zeros(f), w, torch.zeros(store.d_in), "topk", k=K)
            index = index_examples(sae, store, top_k=10, reservoir=64, contrast=20)
            picked = list(range(0, f, max(1, f // 64)))[:64]
            opts = {"n_top": 10, "n_quantiles": 10, "n_contrast": 20}
            c0 = time.process_time()
            one = [example_set(sae, store, index, j, **opts)[1] for j in picked]
            c1 = time.process_time()
            block = [maps for _, maps in example_sets(sae, store, index, picked, **opts)]
            c2 = time.process_time()
            diff = max((float((m - a[k]).abs().max()) for a, b in zip(one, block) for k, m in b.items()), default=0.0)
            print(f"{f} features, {len(store)} rows in {len(store.manifest.shards)} shards: maps of {len(picked)} features' "
                  f"examples: one pass each {c1 - c0:.2f} CPU s, one pass for all {c2 - c1:.2f} CPU s (max |diff| {diff:.1e})",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--sample", type=int, default=64, help="features explained per F (the rest extrapolated)")
    parser.add_argument("--block", type=int, default=BLOCK, help="features per pass over the store for example maps "
                        "(1: the per-feature path, one pass each)")
    parser.add_argument("--maps", nargs=2, type=int, metavar=("ROWS", "SHARD_ROWS"),
                        help="only time the example maps of 64 features, per feature against batched")
    parser.add_argument("--one", nargs=4, metavar=("DIR", "FEATURES", "SAMPLE", "BLOCK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]), int(args.one[3]))))
        return
    if args.maps:
        run_maps(args.maps[0], args.maps[1], args.features)
        return
    print(f"{'features':>8} {'rows':>7} {'items':>6} {'index s':>8} {'sample':>6} {'s/feature':>9} {'feat/min':>8} "
          f"{'feat/CPU min':>12} {'all F min':>9} {'peak MB':>8} {'+MB':>6} {'ex ok':>5} {'dead':>4}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            directory = Path(tmp) / f"rows{rows}"
            make_collection(directory, rows)
            for features in args.features:
                out = subprocess.run([sys.executable, __file__, "--one", str(directory), str(features), str(args.sample), str(args.block)],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{r['features']:>8} {r['rows']:>7} {r['items']:>6} {r['index_s']:>8} {r['sample']:>6} "
                      f"{r['per_feature_s']:>9} {r['features_per_min']:>8} {r['features_per_cpu_min']:>12} {r['all_features_min']:>9} {r['peak_rss_mb']:>8} "
                      f"{r['peak_over_before_mb']:>6} {r['examples_ok']:>5} {r['dead']:>4}", flush=True)
                print(json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
