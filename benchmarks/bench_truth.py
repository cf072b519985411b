"""Does "clear" mean something? False-clear rates on models whose latents mean nothing, and
thresholds calibrated on some model families and tested on another, in one run.

Families (offline explainer, 5 answers per latent, default measure ``agree``):
  demo           the shipped beta-TCVAE: latents that capture a factor are positives, the rest negatives
  shapes2-vae    a ``train-vae`` model trained on shapes2 (data the demo never saw), when its directory is
                 given (``--shapes2-vae DIR`` or env BENCH_TRUTH_SHAPES2_VAE); positives: latents that capture
                 a factor on 2000 held-out shapes2 images (seed 1, made here; ``--shapes2-eval NPZ`` to read them)
  VAE models     any ``train-vae`` directory with an npz of factors (``--vae NAME=MODEL_DIR:DATA.npz``)
  random-vae     the demo architecture with random weights (seeded): every latent negative
  collapsed-vae  the demo model whose decoder ignores z (its first layer's weights zeroed): negatives
  random-unet-S  random-weight diffusers UNet2DModel, S x S pixels, 10 DDIM steps, 6 PCA directions of
                 h-space: negatives (pure-noise images)
  random-pixel-gen  a forward(z) generator whose every pixel is sigmoid of a random linear map of z
                 (16 px, 8 latents, 3 seeds): negatives; its traversals change consistently (each pixel is
                 the same function of z in every base), but the images are noise textures, not objects
  random-dcgan   a DCGAN-shaped ConvTranspose generator with random weights (32 px, 8 latents, 3 seeds):
                 negatives (smooth random textures)

Per family: latents, positives, clear, false-clear rate (clear negatives / negatives), factor-aligned
latents named clearly, and how many latents the image evidence alone rejects. Then leave one family
out: the certainty threshold is fitted (balanced accuracy, ``calibrate_threshold``) on the other
families and applied to the held-out one.

    python benchmarks/bench_truth.py                      # about 15 minutes on a 2-core CPU
    python benchmarks/bench_truth.py --sizes 16 --quick   # a smoke run
    latentexplainer make-data --dataset shapes2 --n 20000 --seed 0 --out s2_train.npz
    latentexplainer train-vae --data s2_train.npz --out s2_6000 --steps 6000
    python benchmarks/bench_truth.py --shapes2-vae s2_6000  # adds the second positive family
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch

SIMILARITY = "agree"
SHAPES2_ENV = "BENCH_TRUTH_SHAPES2_VAE"
SHAPES2_HELD_OUT = "shapes2:2000:1"  # made in process: make-data --dataset shapes2 --n 2000 --seed 1


def check_model_dir(model_dir: str, parser: argparse.ArgumentParser) -> str:
    """Refuse a model directory without a config.json before any work starts."""
    if not (Path(model_dir) / "config.json").is_file():
        parser.error(f"{model_dir} is not a train-vae model directory (no config.json in it)")
    return model_dir


def parse_vae_spec(spec: str, parser: argparse.ArgumentParser) -> tuple[str, str, str]:
    """``NAME=MODEL_DIR:DATA.npz`` -> (name, model_dir, npz), checked for existence."""
    name, sep, rest = spec.partition("=")
    model_dir, colon, npz = rest.rpartition(":")
    if not (sep and colon and name and model_dir and npz):
        parser.error(f"--vae {spec!r}: expected NAME=MODEL_DIR:DATA.npz")
    if not Path(npz).is_file():
        parser.error(f"--vae {spec!r}: data file {npz} does not exist")
    return name, check_model_dir(model_dir, parser), npz


def load_trained(model_dir: str, npz: str) -> tuple[Any, dict]:
    """The model and its held-out data (an npz path, or ``dataset:n:seed`` made in process)."""
    from latentexplainer_plugin.adapters.vae import load_vae
    from latentexplainer_plugin.data import load_npz

    if npz == SHAPES2_HELD_OUT:
        from latentexplainer_plugin.data.shapes2 import make_dataset

        _, n, seed = npz.split(":")
        data = make_dataset(int(n), seed=int(seed))
        data["factor_names"] = [str(x) for x in data["factor_names"]]
    else:
        data = load_npz(npz, need_factors=True)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    size, channels = data["images"].shape[1], data["images"].shape[3]
    if (config.get("image_size"), config.get("channels")) != (size, channels):
        raise SystemExit(f"{model_dir} takes {config.get('image_size')}x{config.get('image_size')}x"
                         f"{config.get('channels')} images, its data {npz} has {size}x{size}x{channels}")
    return load_vae(model_dir), data


@dataclass
class Row:
    family: str
    latent: str
    label: bool  # the latent captures a ground-truth factor
    certainty: float | None
    text_clear: bool  # the answers agree (certainty >= threshold and most answers explain something)
    explains: bool  # most valid answers explain something (do not abstain)
    consistent: bool  # the image evidence shows a consistent change
    clear: bool
    explanation: str | None
    factor: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def rows_from(family: str, results: Any, labels: dict[int, tuple[bool, str | None]]) -> list[Row]:
    out = []
    for r in results:
        ev = r.evidence
        consistent = bool(getattr(ev, "consistent", True)) if ev is not None else True
        label, factor = labels.get(r.index, (False, None))
        valid = [x for x in r.responses if x.ok]
        explains = sum(not x.abstained for x in valid) > len(valid) / 2
        text_clear = explains and r.certainty is not None and r.certainty >= results.info["threshold"]
        out.append(Row(family, r.id, label, r.certainty, bool(text_clear), bool(explains), consistent,
                       bool(r.clear), r.explanation, factor))
    return out


def vae_family(name: str, model: Any, data: dict | None, samples: int) -> list[Row]:
    from latentexplainer_plugin import LatentExplainer
    from latentexplainer_plugin.run import KL_ACTIVE, latent_stats

    labels: dict[int, tuple[bool, str | None]] = {}
    clamp = None
    if data is not None:
        stats = latent_stats(model, data["images"], data["factors"], data["factor_names"])
        for i, m in enumerate(stats.factors):
            labels[i] = (bool(stats.kl[i] > KL_ACTIVE and m.factor is not None), m.factor)
        from latentexplainer_plugin.attribution import most_active_other

        clamp = most_active_other(stats.kl)
    explainer = LatentExplainer(model, backend="offline", samples=samples, similarity=SIMILARITY, clamp=clamp)
    return rows_from(name, explainer.attribute(), labels)


def random_unet_family(size: int, samples: int, n_directions: int, seed: int = 0) -> list[Row]:
    from diffusers import DDIMScheduler, UNet2DModel

    from latentexplainer_plugin import DDPMAdapter, LatentExplainer
    from latentexplainer_plugin.directions.pca import pca

    torch.manual_seed(seed)
    channels = (32, 64) if size <= 32 else (32, 64, 64)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * len(channels),
                       up_block_types=("UpBlock2D",) * len(channels)).eval()
    adapter = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=10, t_edit=500, scale="auto")
    adapter.set_directions(pca(adapter, n_directions=n_directions, n_samples=16, seed=seed))
    explainer = LatentExplainer(adapter, backend="offline", samples=samples, similarity=SIMILARITY)
    return rows_from(f"random-unet-{size}", explainer.attribute(), {})


def random_unet_sae_family(size: int, samples: int, n_features: int = 8, seed: int = 0,
                           sampled_examples: int = 128, sparse: bool = False) -> list[Row]:
    """SAE features of a random UNet's h-space at mid_block.output, each feature steered on every step of
    the edit window and shown its examples among ``sampled_examples`` of the model's own samples.

    Dense (default): a random TopK SAE (128 features, k=8); its features fire on most samples, so the
    contrast sets are thin. ``sparse``: a JumpReLU SAE with random unit directions whose thresholds
    make each feature fire on about 30 % of the samples (the 70th percentile of its per-sample peak
    pre-activation over 32 other samples), so the examples have full firing and non-firing sets: the
    harder negative. Nothing here means anything: every row is a negative, and a row is clear when
    either kind of evidence gives a clear explanation (``extra["examples_clear"]`` says which)."""
    from diffusers import DDIMScheduler, UNet2DModel

    from latentexplainer_plugin import DDPMAdapter, LatentExplainer
    from latentexplainer_plugin.sae import SAEFeatureAdapter, SparseAutoencoder

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    inner = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=10, t_edit=500)
    g = torch.Generator().manual_seed(seed + 1)
    d = 64
    if sparse:
        directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=1)
        h = inner.capture_h(inner.sample_bases(32, seed=seed + 99), window_only=False)  # (32, steps, d, s, s)
        peaks = (h.movedim(2, -1) @ directions.T).flatten(1, 3).amax(1)  # (32, features)
        sae = SparseAutoencoder(directions.T.clone(), torch.zeros(n_features), directions.clone(), torch.zeros(d),
                                "jumprelu", threshold=peaks.quantile(0.7, dim=0), apply_b_dec_to_input=False)
        features, name = None, f"random-unet-sparse-sae-{size}"
    else:
        f = 128
        sae = SparseAutoencoder(torch.randn(d, f, generator=g) / d ** 0.5, torch.zeros(f),
                                torch.randn(f, d, generator=g) / d ** 0.5, torch.zeros(d), "topk", k=8)
        features, name = list(range(n_features)), f"random-unet-sae-{size}"
    adapter = SAEFeatureAdapter(inner, sae, features=features, stats_bases=16, sampled_examples=sampled_examples)
    results = LatentExplainer(adapter, backend="offline", samples=samples, similarity=SIMILARITY).attribute()
    rows = rows_from(name, results, {})
    for row, result in zip(rows, results):
        record = result.extras.get("examples") or {}
        row.extra["examples_clear"] = bool(record.get("clear"))
        if record.get("clear"):
            row.clear, row.explanation = True, f"(examples) {record.get('explanation')}"
    return rows


class PixelGenerator(torch.nn.Module):
    """Every pixel a fixed random function of z: sigmoid of a random (seeded) linear map, 16 x 16 RGB."""

    def __init__(self, seed: int, nz: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(nz, 3 * 16 * 16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(z)).view(len(z), 3, 16, 16)


class RandomDCGAN(torch.nn.Module):
    """DCGAN-shaped generator (1 -> 4 -> 8 -> 16 -> 32 px) with random (seeded) weights and no BatchNorm;
    the last layer is scaled so the tanh output spans most of [-1, 1]."""

    def __init__(self, seed: int, nz: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        t = torch.nn.ConvTranspose2d
        self.nz = nz
        self.net = torch.nn.Sequential(t(nz, 64, 4, 1, 0), torch.nn.ReLU(), t(64, 32, 4, 2, 1), torch.nn.ReLU(),
                                       t(32, 16, 4, 2, 1), torch.nn.ReLU(), t(16, 3, 4, 2, 1))
        with torch.no_grad():
            scale = self.net(torch.randn(256, nz, 1, 1)).std()
            self.net[-1].weight.mul_(2.0 / scale)
            self.net[-1].bias.mul_(2.0 / scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z.view(len(z), self.nz, 1, 1)))


def random_generator_family(name: str, make: Any, samples: int, seeds: tuple[int, ...] = (0, 1, 2)) -> list[Row]:
    from latentexplainer_plugin import LatentExplainer
    from latentexplainer_plugin.adapters.generator import GeneratorAdapter

    rows: list[Row] = []
    for seed in seeds:
        explainer = LatentExplainer(GeneratorAdapter(make(seed).eval()), backend="offline", samples=samples,
                                    similarity=SIMILARITY)
        rows += [replace_latent(r, f"s{seed}.") for r in rows_from(name, explainer.attribute(), {})]
    return rows


def replace_latent(row: Row, prefix: str) -> Row:
    row.latent = prefix + row.latent
    return row


def collapsed(model: Any) -> Any:
    """A copy of ``model`` whose decoder ignores z: its first layer that reads z has zero weights."""
    import copy

    model = copy.deepcopy(model)
    for module in model.decoder.modules() if hasattr(model, "decoder") else model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            with torch.no_grad():
                module.weight.zero_()
            return model
    raise ValueError("found no layer to zero")


def randomized(model: Any, seed: int) -> Any:
    import copy

    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
    return model.eval()


def summary(rows: list[Row]) -> None:
    print(f"{'family':16s} {'latents':>7s} {'pos':>4s} {'clear':>5s} {'false-clear':>11s} {'pos clear':>9s} "
          f"{'evidence rejects':>16s} {'text clear':>10s}")
    for fam in dict.fromkeys(r.family for r in rows):
        rs = [r for r in rows if r.family == fam]
        neg = [r for r in rs if not r.label]
        pos = [r for r in rs if r.label]
        fc = sum(r.clear for r in neg)
        print(f"{fam:16s} {len(rs):7d} {len(pos):4d} {sum(r.clear for r in rs):5d} "
              f"{fc:4d}/{len(neg):<3d} ({fc / max(1, len(neg)):.2f}) {sum(r.clear for r in pos):4d}/{len(pos):<4d} "
              f"{sum(not r.consistent for r in rs):16d} {sum(r.text_clear for r in rs):10d}")


def leave_one_family_out(rows: list[Row], default: float) -> None:
    from latentexplainer_plugin.uncertainty import calibrate_threshold

    print("\nleave one family out (threshold on certainty, fitted on the other families; clear also needs the evidence):")
    print(f"{'held out':16s} {'threshold':>9s} {'fitted on':>9s} {'false-clear':>11s} {'pos clear':>9s}")
    for fam in dict.fromkeys(r.family for r in rows):
        train = [r for r in rows if r.family != fam and r.certainty is not None]
        test = [r for r in rows if r.family == fam]
        labels = [r.label for r in train]
        if all(labels) or not any(labels):
            t, source = default, "default"
        else:
            t, source = calibrate_threshold([r.certainty for r in train], labels), f"{len(train)}"
        pred = [bool(r.explains and r.certainty is not None and r.certainty >= t and r.consistent) for r in test]
        neg = [p for p, r in zip(pred, test) if not r.label]
        pos = [p for p, r in zip(pred, test) if r.label]
        print(f"{fam:16s} {t:9.3f} {source:>9s} {sum(neg):4d}/{len(neg):<3d} ({sum(neg) / max(1, len(neg)):.2f}) "
              f"{sum(pos):4d}/{len(pos):<4d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16,32,64", help="random UNet image sizes")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--directions", type=int, default=6, help="PCA directions per random UNet")
    p.add_argument("--vae", action="append", default=[], help="NAME=MODEL_DIR:DATA.npz, a trained VAE with factors")
    p.add_argument("--shapes2-vae", default=os.environ.get(SHAPES2_ENV) or None, metavar="DIR",
                   help=f"a train-vae model trained on shapes2: the family 'shapes2-vae' (default: env {SHAPES2_ENV})")
    p.add_argument("--shapes2-eval", default=None, metavar="NPZ",
                   help="held-out shapes2 images with factors (default: 2000 made here with seed 1)")
    p.add_argument("--quick", action="store_true", help="fewer UNet directions")
    p.add_argument("--families", default=None, metavar="LIST",
                   help="only these families (comma-separated name prefixes, e.g. random-unet-sae); default: all")
    args = p.parse_args()
    # every trained family is checked before the minutes spent on the demo families
    specs = [parse_vae_spec(s, p) for s in args.vae]
    if args.shapes2_eval and not Path(args.shapes2_eval).is_file():
        p.error(f"--shapes2-eval: data file {args.shapes2_eval} does not exist")
    if args.shapes2_vae:
        specs.insert(0, ("shapes2-vae", check_model_dir(args.shapes2_vae, p), args.shapes2_eval or SHAPES2_HELD_OUT))
    elif args.shapes2_eval:
        p.error("--shapes2-eval needs --shapes2-vae DIR (or env BENCH_TRUTH_SHAPES2_VAE)")
    if len({name for name, _, _ in specs}) != len(specs):
        p.error("two trained families share a name: " + ", ".join(name for name, _, _ in specs))
    torch.set_num_threads(1)
    from latentexplainer_plugin import load_demo_model
    from latentexplainer_plugin.demo import demo_data
    from latentexplainer_plugin.uncertainty import get_similarity

    t0 = time.perf_counter()
    demo = load_demo_model()
    data = demo_data(1000)
    plan: list[tuple[str, Any]] = [
        (name, lambda model=model, d=d, name=name: vae_family(name, model, d, args.samples))
        for name, model, d in (("demo", demo, data), ("random-vae", randomized(demo, 1), None),
                               ("collapsed-vae", collapsed(demo), None))]
    plan += [(name, lambda name=name, model_dir=model_dir, npz=npz: vae_family(name, *load_trained(model_dir, npz), args.samples))
             for name, model_dir, npz in specs]
    plan += [(name, lambda name=name, make=make: random_generator_family(name, make, args.samples))
             for name, make in (("random-pixel-gen", PixelGenerator), ("random-dcgan", RandomDCGAN))]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    plan += [(f"random-unet-{size}", lambda size=size: random_unet_family(size, args.samples, 3 if args.quick else args.directions))
             for size in sizes]
    plan += [(f"random-unet-sae-{size}", lambda size=size: random_unet_sae_family(size, args.samples)) for size in sizes]
    plan += [(f"random-unet-sparse-sae-{size}", lambda size=size: random_unet_sae_family(size, args.samples, sparse=True))
             for size in sizes]
    if args.families:
        wanted = [w.strip() for w in args.families.split(",") if w.strip()]
        plan = [(name, run) for name, run in plan if any(name.startswith(w) for w in wanted)]
        if not plan:
            p.error(f"--families {args.families}: no family starts with these names")
    rows: list[Row] = []
    timing = {}
    for name, run in plan:
        t = time.perf_counter()
        rows += run()
        timing[name] = time.perf_counter() - t
    print(f"measure {SIMILARITY}, threshold {get_similarity(SIMILARITY).default_threshold}, offline explainer, "
          f"{args.samples} answers per latent\n")
    summary(rows)
    leave_one_family_out(rows, get_similarity(SIMILARITY).default_threshold)
    print("\npositives (captured factor: explanation if clear):")
    for r in rows:
        if r.label:
            print(f"  {r.family} {r.latent} {r.factor}: "
                  + (f"[{r.certainty:.2f}] {r.explanation}" if r.clear else "not clear"))
    clear_neg = [r for r in rows if r.clear and not r.label]
    if clear_neg:
        print("\nclear negatives:")
        for r in clear_neg:
            print(f"  {r.family} {r.latent} [{r.certainty:.2f}] {r.explanation}")
    print("\nseconds per family: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items())
          + f"; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
