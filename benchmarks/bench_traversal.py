"""Time to build every traversal of the demo VAE: adapter (nnsight edit, batched) vs raw decoder calls.

Prints, from one run: (a) one batched raw decoder call over exactly the same latents, (b) a naive
loop decoding one image at a time, and the adapter's ratios to both (goal: <= 1.15x of (a), faster than (b)).

    python benchmarks/bench_traversal.py [--repeats 5] [--samples 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from latentexplainer_plugin.adapters import DEFAULT_STRENGTHS, VAEAdapter
from latentexplainer_plugin.demo import load_demo_model


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed run: noise only ever adds time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_demo_model()
    adapter = VAEAdapter(model, max_batch=100_000)
    bases = adapter.sample_bases(args.samples)
    strengths = torch.tensor(DEFAULT_STRENGTHS)
    indices = list(range(model.latent_dim))
    clamp = {i: (i + 1) % model.latent_dim for i in indices}

    # The exact latents the adapter decodes (latent x base x row x step), built by hand.
    zs = []
    for i in indices:
        for b in range(args.samples):
            for value in (-1.5, 1.5):
                for s in strengths:
                    z = bases[b].clone()
                    z[clamp[i]] = value
                    z[i] = s
                    zs.append(z)
    z_all = torch.stack(zs)

    def adapter_run():
        adapter.traverse(indices, bases, strengths, rows=2, clamp=clamp)

    @torch.no_grad()
    def raw_batched():
        model.decode(z_all)

    @torch.no_grad()
    def naive_loop():
        for z in z_all:
            model.decode(z[None])

    adapter_run(), raw_batched()  # warm-up
    t_adapter = best_of(adapter_run, args.repeats)
    t_raw = best_of(raw_batched, args.repeats)
    t_naive = best_of(naive_loop, max(1, args.repeats // 2))
    print(f"images per run: {len(z_all)} ({len(indices)} latents x {args.samples} bases x 2 rows x {len(strengths)} steps)")
    print(f"adapter (nnsight edit, batched): {t_adapter * 1000:8.1f} ms")
    print(f"(a) raw batched decoder call:    {t_raw * 1000:8.1f} ms   adapter / raw = {t_adapter / t_raw:.3f}x (goal <= 1.15x)")
    print(f"(b) naive one-image loop:        {t_naive * 1000:8.1f} ms   adapter / naive = {t_adapter / t_naive:.3f}x (goal < 1)")


if __name__ == "__main__":
    main()
