"""Cost of an h-space traversal through nnsight, against sampling the same batch without it.

Three ways to sample one batch of (bases x strengths) images with a random UNet2DModel and DDIM:
  plain      the sampling loop, no edit, no nnsight (what the traversal cannot beat)
  hook loop  the same loop with a plain torch forward hook adding alpha * v to mid_block's output
  adapter    DDPMAdapter.traverse: one nnsight trace over the whole loop, the edit in the trace
Each is timed ``--repeats`` times, interleaved. Reported: the minimum wall time (least disturbed by
other work on the machine), the median wall time, and the minimum CPU time of this process (all
its threads; on a CPU shared with other jobs it is steadier than wall time). Ratios use minima.

    python benchmarks/bench_diffusion.py --threads 1      # 64x64, channels 64,128,256, 10 steps
    python benchmarks/bench_diffusion.py --device cuda --steps 50

On a CPU shared with other jobs use --threads 1: spinning OpenMP threads otherwise add +-30% noise.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch


def build_unet(size: int, channels: tuple[int, ...], seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    n = len(channels)
    groups = 32 if min(channels) >= 32 else 8
    return UNet2DModel(sample_size=size, block_out_channels=channels, layers_per_block=1, norm_num_groups=groups,
                       down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", default="64,128,256")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bases", type=int, default=1)
    p.add_argument("--strengths", default="-3,-1.5,0,1.5,3")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler

    from latentexplainer_plugin.adapters.diffusion import DDPMAdapter

    device = torch.device(args.device)
    channels = tuple(int(c) for c in args.channels.split(","))
    strengths = torch.tensor([float(s) for s in args.strengths.split(",")])
    unet = build_unet(args.size, channels).to(device)
    adapter = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=args.steps, t_edit=0, scale=1.0)
    adapter.set_directions(torch.randn(1, *adapter.h_shape(), generator=torch.Generator().manual_seed(1)))
    bases = adapter.sample_bases(args.bases, seed=0)
    n, s = len(bases), len(strengths)
    batch = bases[:, None].expand(n, s, *bases.shape[1:]).reshape(-1, *bases.shape[1:]).to(device)
    alpha = strengths.repeat(n).to(device).view(-1, 1, 1, 1)
    v = adapter.directions[0].to(device)

    @torch.no_grad()
    def plain():
        adapter.driver(batch)
        sync(device)

    @torch.no_grad()
    def hook_loop():
        handle = unet.mid_block.register_forward_hook(lambda m, a, out: out + alpha * v)
        try:
            adapter.driver(batch)
        finally:
            handle.remove()
        sync(device)

    def traverse():
        adapter.traverse([0], bases, strengths)
        sync(device)

    runs = {"plain": plain, "hook loop": hook_loop, "adapter": traverse}
    for fn in runs.values():  # warm-up: allocator, nnsight's first trace
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    best = {name: min(ts) for name, ts in times.items()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    cpu = {name: min(ts) for name, ts in cpu_times.items()}

    print(f"command: python {' '.join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"model: UNet2DModel {args.size}x{args.size}, block_out_channels={channels}, h-space {adapter.h_shape()}; "
          f"DDIM {args.steps} steps; batch {n} base(s) x {s} strengths = {n * s} images; {args.repeats} runs each")
    print(f"  {'':<10} {'wall min':>9} {'wall median':>12} {'CPU min':>9} {'CPU ms/step':>12}")
    for name in runs:
        print(f"  {name:<10} {best[name]:8.3f}s {med[name]:11.3f}s {cpu[name]:8.3f}s {cpu[name] / args.steps * 1e3:12.1f}")
    for other in ("plain", "hook loop"):
        goal = "   goal <= 1.10x" if other == "plain" else ""
        print(f"adapter / {other:<9} = {best['adapter'] / best[other]:.3f}x wall, {cpu['adapter'] / cpu[other]:.3f}x CPU{goal}")
    print(f"adapter - hook loop = {(cpu['adapter'] - cpu['hook loop']) / args.steps * 1e3:+.2f} ms CPU per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
