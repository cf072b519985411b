"""Image evidence (latentexplainer_plugin/evidence.py) on real generators and on noise generators.

Traverses every latent / direction and prints one table line each: change, ratio to the variation
between bases, agreement (descriptor and map cosines), its z-score, and the verdict.

  (a) the shipped demo VAE: 5 active latents (KL > 0.05) must be consistent, 5 collapsed must not;
  (b) a random-weight copy of the demo VAE architecture (weights re-initialised, seed 0);
  (c) random-weight diffusers UNet2DModels at 16, 32 and 64 px, DDIM with the ddpm adapter and
      PCA directions: none should be consistent.

Traversals use what ``latentexplainer demo`` / ``explain`` use: strengths -3..3 (5 steps), 5 base
latents, 2 rows (disentanglement) for the VAEs and 1 row (combination) for the UNets.

    python benchmarks/bench_evidence.py                # about 3 minutes on 2 busy CPU cores
    python benchmarks/bench_evidence.py --sizes 16 --bases 4   # fewer strips: chance agreement
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

STRENGTHS = torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0])


def _row(group: str, lid: str, kl: float | None, ev) -> str:
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    return (f"| {group} | {lid} | {f(kl, 2)} | {f(ev.change, 4)} | {f(ev.ratio)} | {f(ev.descriptor_agreement, 2)} | "
            f"{f(ev.map_agreement, 2)} | {f(ev.significance, 1)} | {ev.strips} | {'yes' if ev.visible else 'no'} | "
            f"{'**yes**' if ev.consistent else 'no'} |")


def vae_rows(model, kl, group: str, bases: int, show_kl: bool = True) -> tuple[list[str], list[bool]]:
    from latentexplainer_plugin.adapters.vae import VAEAdapter
    from latentexplainer_plugin.attribution import most_active_other
    from latentexplainer_plugin.evidence import traversal_evidence

    adapter = VAEAdapter(model)
    traversals = adapter.traverse(list(range(adapter.n_latents)), adapter.sample_bases(bases, seed=0), STRENGTHS, rows=2,
                                  clamp=most_active_other(kl))
    rows, verdicts = [], []
    for i, t in enumerate(traversals):
        ev = traversal_evidence(t)
        rows.append(_row(group, t.latent_id, float(kl[i]) if show_kl else None, ev))
        verdicts.append(ev.consistent)
    return rows, verdicts


def unet_rows(size: int, directions: int, bases: int) -> tuple[list[str], list[bool]]:
    from diffusers import DDIMScheduler, UNet2DModel

    from latentexplainer_plugin.adapters.diffusion import DDPMAdapter
    from latentexplainer_plugin.directions import pca
    from latentexplainer_plugin.evidence import traversal_evidence

    channels = (16, 32) if size <= 16 else (32, 64)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    adapter = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=5, t_edit=500)
    adapter.set_directions(pca(adapter, n_directions=directions, n_samples=8))
    rows, verdicts = [], []
    for t in adapter.traverse(list(range(directions)), adapter.sample_bases(bases, seed=0), STRENGTHS, rows=1):
        ev = traversal_evidence(t)
        rows.append(_row(f"random UNet {size}px", t.latent_id, None, ev))
        verdicts.append(ev.consistent)
    return rows, verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,32,64", help="UNet image sizes")
    p.add_argument("--directions", type=int, default=4, help="PCA directions per UNet")
    p.add_argument("--bases", type=int, default=5, help="base latents per traversal")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from latentexplainer_plugin.demo import demo_data, load_demo_model
    from latentexplainer_plugin.models.training import latent_kl
    from latentexplainer_plugin.evidence import MIN_CHANGE, MIN_CONSISTENCY, MIN_RATIO, MIN_SIGNIFICANCE

    started = time.perf_counter()
    print(f"thresholds: change >= {MIN_CHANGE:.4f}, ratio >= {MIN_RATIO}, agreement >= {MIN_CONSISTENCY}, "
          f"z >= {MIN_SIGNIFICANCE}; {args.bases} bases, strengths {STRENGTHS.tolist()}\n")
    print("| model | latent | KL | change | ratio | descriptor agr. | map agr. | z | strips | visible | consistent |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    model = load_demo_model(device="cpu")
    kl = latent_kl(model, demo_data(512)["images"])
    rows, verdicts = vae_rows(model, kl, "demo VAE", args.bases)
    print("\n".join(rows))
    active = [bool(k > 0.05) for k in kl]
    summary.append(f"demo VAE: {sum(v for v, a in zip(verdicts, active) if a)}/{sum(active)} active latents consistent, "
                   f"{sum(v for v, a in zip(verdicts, active) if not a)}/{len(active) - sum(active)} collapsed consistent")
    random_vae = copy.deepcopy(model)
    torch.manual_seed(0)
    for module in random_vae.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    # the demo's KL only picks the clamp partners (the same as for the demo); a random model has no data KL
    rows, verdicts = vae_rows(random_vae, kl, "random demo VAE", args.bases, show_kl=False)
    print("\n".join(rows))
    summary.append(f"random-weight demo VAE: {sum(verdicts)}/{len(verdicts)} latents consistent")
    for size in (int(s) for s in args.sizes.split(",") if s):
        rows, verdicts = unet_rows(size, args.directions, args.bases)
        print("\n".join(rows))
        summary.append(f"random UNet {size}px: {sum(verdicts)}/{len(verdicts)} directions consistent")
    print()
    print("\n".join(summary))
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
