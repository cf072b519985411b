"""Streaming example selection for SAE features: features processed per minute and peak memory.

For every (features, activation rows) pair, a fresh process runs ``index_examples`` (top-k,
quantile reservoir and contrast sample of every feature, one pass over the shards) with a random
TopK SAE (k=32) over a synthetic collection (d_in 64, 4x4 positions per item), and reports wall
time, features per minute, peak RSS, and the peak above the process's RSS just before the pass.
The full item x feature matrix that streaming avoids is shown for comparison. One torch thread.

    nice -n 10 python benchmarks/bench_sae.py [--features 1000 4000 16000] [--rows 10000 100000]

``--demo`` instead runs the whole path on the demo VAE: 2000 held-out shapes images through the
encoder, activations collected at ``encoder.conv.5`` (64 channels, 8x8 positions), a TopK SAE
trained with sparsify (256 features, k=8), its metrics, the example index, and the IoU of each live
feature's top-5 activation masks with the objects' masks (``--save PNG`` draws the best feature):

    nice -n 10 python benchmarks/bench_sae.py --demo [--save best.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_IN, GRID, K = 64, (4, 4), 32


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak (VmHWM) in MB. Not ru_maxrss: after fork +
    exec that also counts the parent's resident memory at the fork (Linux keeps the larger)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_collection(directory: Path, rows: int) -> None:
    import torch
    from torch import nn

    from latentexplainer_plugin.sae.collect import collect_activations

    g = torch.Generator().manual_seed(0)
    items = rows // (GRID[0] * GRID[1])

    def batches():
        for start in range(0, items, 250):
            yield torch.randn(min(250, items - start), D_IN, *GRID, generator=g)

    collect_activations(nn.Identity(), "", batches, directory, shard_rows=16384)


def run_one(directory: str, features: int) -> dict:
    import torch

    from latentexplainer_plugin.sae import SparseAutoencoder
    from latentexplainer_plugin.sae.collect import ActivationStore
    from latentexplainer_plugin.sae.examples import index_examples

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    w_dec = torch.randn(features, D_IN, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    sae = SparseAutoencoder(w_dec.T.contiguous(), torch.zeros(features), w_dec, torch.zeros(D_IN), "topk", k=K)
    store = ActivationStore(directory)
    before = _rss_mb()
    t0 = time.perf_counter()
    index = index_examples(sae, store, top_k=10, reservoir=64, contrast=10)
    seconds = time.perf_counter() - t0
    peak = _rss_mb("VmHWM")
    return {"features": features, "rows": len(store), "items": store.manifest.n_items, "seconds": round(seconds, 2),
            "features_per_min": round(features / seconds * 60), "peak_rss_mb": round(peak), "rss_before_mb": round(before),
            "peak_over_before_mb": round(peak - before), "full_matrix_mb": round(store.manifest.n_items * features * 4 / 2**20),
            "dead": len(index.dead_features())}


def run_demo(save: str | None) -> None:
    import numpy as np
    import torch

    from latentexplainer_plugin.data.shapes import make_dataset
    from latentexplainer_plugin.demo import DEMO_EVAL_SEED, load_demo_model
    from latentexplainer_plugin.sae.collect import collect_activations
    from latentexplainer_plugin.sae.examples import activation_maps, example_set, feature_iou, index_examples, render_example_set
    from latentexplainer_plugin.sae.train import train_sae

    torch.set_num_threads(1)
    vae = load_demo_model().eval()
    data = make_dataset(2000, seed=DEMO_EVAL_SEED, masks=True)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255
    with tempfile.TemporaryDirectory() as tmp:
        acts = Path(tmp) / "acts"
        t0 = time.perf_counter()
        m = collect_activations(vae.encoder, "conv.5", [images[i:i + 100] for i in range(0, 2000, 100)], acts, shard_rows=32768)
        t1 = time.perf_counter()
        sae, report = train_sae(acts, d_sae=256, k=8, steps=800, batch_size=1024, seed=0, site="encoder.conv.5.output")
        t2 = time.perf_counter()
        index = index_examples(sae, acts, top_k=5)
        t3 = time.perf_counter()
        live = [j for j in range(sae.d_sae) if index.n_active[j] > 0]
        maps = activation_maps(sae, acts, [(j, e.item) for j in live for e in index.examples(j).top])
        ious = {j: feature_iou([maps[(j, e.item)] for e in index.examples(j).top],
                               [data["masks"][e.item] for e in index.examples(j).top]) for j in live}
        v = np.array([x for x in ious.values() if x == x])
        met = report.metrics
        print(f"collect: {m.count} rows x {m.d_in} ({m.n_items} images, positions {m.positions}) in {t1 - t0:.1f} s")
        print(f"train (sparsify, 256 features, k=8, 800 steps x 1024 rows): {t2 - t1:.1f} s")
        print(f"FVU {met['fvu']:.4f}  L0 {met['l0']:.2f}  dead (rows) {met['n_dead']}  dense (>10% of rows) {met['n_dense']}")
        print(f"example index: {t3 - t2:.1f} s; features never on in any image {len(index.dead_features())}, "
              f"on in >10% of images {len(index.dense_features())}")
        print(f"IoU (top-5 masks at 0.5 x max vs object masks), {len(v)} live features: median {np.median(v):.3f}, "
              f"90th percentile {np.percentile(v, 90):.3f}, above 0.5: {int((v > 0.5).sum())}")
        best = max(ious, key=lambda j: (ious[j] if ious[j] == ious[j] else -1, -j))
        print(f"best feature {best}: IoU {ious[best]:.3f}, on in {int(index.n_active[best])} of {index.n_items} images")
        if save:
            ex, amaps = example_set(sae, acts, index, best)
            render_example_set(ex, data["images"], amaps).save(save)
            print(f"wrote {save}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--demo", action="store_true", help="run the whole path on the demo VAE instead")
    parser.add_argument("--save", help="with --demo: draw the best feature's example set to this PNG")
    parser.add_argument("--one", nargs=2, metavar=("DIR", "FEATURES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    if args.demo:
        run_demo(args.save)
        return
    print(f"{'features':>8} {'rows':>7} {'items':>6} {'seconds':>8} {'feat/min':>9} {'peak MB':>8} {'+MB':>6} {'full matrix MB':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            directory = Path(tmp) / f"rows{rows}"
            make_collection(directory, rows)
            for features in args.features:
                out = subprocess.run([sys.executable, __file__, "--one", str(directory), str(features)],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{r['features']:>8} {r['rows']:>7} {r['items']:>6} {r['seconds']:>8} {r['features_per_min']:>9} "
                      f"{r['peak_rss_mb']:>8} {r['peak_over_before_mb']:>6} {r['full_matrix_mb']:>14}", flush=True)


if __name__ == "__main__":
    main()
