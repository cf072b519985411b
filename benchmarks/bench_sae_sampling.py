"""SAE features in a sampling loop: what steering and sampled examples cost (issue 13), as ratios in one run.

A random UNet2DModel (``--size`` px, channels (32, 64), mid block (B, 64, size/2, size/2)), DDIM
``--steps`` steps, t_edit 500 (the first half of the steps edited), a random TopK SAE (``--features``
features, k=16) at ``mid_block.output``. One torch thread. For each of ``--repeats`` rounds (the
minimum is reported, CPU time of this process):

1. plain: ``adapter.sample`` of B = ``--latents`` x ``--bases`` x 4 noises (no nnsight);
2. direction: the ddpm adapter's own traversal of ``--latents`` unit directions (an ``add`` edit on
   every edited step, through nnsight), ``--bases`` bases x 4 strengths: the same B images;
3. sae: ``SAEFeatureAdapter.traverse`` of ``--latents`` features (the SAE edit: encode, set feature k,
   on every edited step), the same bases and 4 quantile strengths: the same B images;
4. sampled examples: ``attach_sampled_examples(B)`` (render + collect + example index) against
   ``adapter.sample`` of B noises.

    nice -n 10 python benchmarks/bench_sae_sampling.py [--size 32] [--steps 10] [--latents 4] [--bases 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--features", type=int, default=1024, help="SAE features (d_sae)")
    parser.add_argument("--latents", type=int, default=4, help="features (and directions) traversed")
    parser.add_argument("--bases", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from diffusers import DDIMScheduler, UNet2DModel

    from latentexplainer_plugin.adapters.diffusion import DDPMAdapter
    from latentexplainer_plugin.sae import SAEFeatureAdapter, SparseAutoencoder

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=args.size, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    ddpm = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=args.steps, t_edit=500, scale=1.0)
    d = ddpm.h_shape()[0]
    g = torch.Generator().manual_seed(1)
    dec = torch.nn.functional.normalize(torch.randn(args.features, d, generator=g), dim=1)
    sae = SparseAutoencoder(dec.T.clone(), torch.zeros(args.features), dec, torch.zeros(d), "topk", k=16)
    adapter = SAEFeatureAdapter(ddpm, sae, features=list(range(args.latents)), stats_bases=8)
    adapter.stats  # statistics once, outside the timings
    ddpm.set_directions(torch.randn(args.latents, *ddpm.h_shape(), generator=g))
    bases = ddpm.sample_bases(args.bases, seed=0)
    n_images = args.latents * args.bases * 4
    noises = ddpm.sample_bases(n_images, seed=3)
    strengths = [-2.0, -1.0, 1.0, 2.0]
    idx = list(range(args.latents))

    plain = cpu_seconds(lambda: ddpm.sample(noises), args.repeats)
    direction = cpu_seconds(lambda: ddpm.traverse(idx, bases, strengths), args.repeats)
    steer = cpu_seconds(lambda: adapter.traverse(idx, bases, strengths), args.repeats)
    fresh = SAEFeatureAdapter(ddpm, sae, features=list(range(args.latents)), stats_bases=8)
    examples = cpu_seconds(lambda: fresh.attach_sampled_examples(n_images, n_top=5, n_quantiles=5, n_contrast=5), args.repeats)
    print(f"random UNet {args.size}px, mid block {tuple(ddpm.h_shape())}, {args.steps} DDIM steps "
          f"({ddpm.edit_calls.stop} edited), SAE {d} -> {args.features} (k=16), {n_images} images per timing, "
          f"1 thread, min of {args.repeats} (CPU s)")
    print(f"  plain sampling           {plain:7.2f} s")
    print(f"  direction traversal      {direction:7.2f} s   {direction / plain:5.2f}x plain")
    print(f"  SAE feature traversal    {steer:7.2f} s   {steer / plain:5.2f}x plain, {steer / direction:5.2f}x direction")
    print(f"  sampled examples         {examples:7.2f} s   {examples / plain:5.2f}x plain (render + collect + index)")


if __name__ == "__main__":
    main()
