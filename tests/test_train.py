"""train-vae: schedules and loss terms against hand-computed values, collapse detection and reporting,
bad input refused before training, and the shapes3 dataset's factors."""

import colorsys
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from latentexplainer_plugin.cli import main
from latentexplainer_plugin.models import training as train_mod
from latentexplainer_plugin.models.conv_vae import ConvVAEConfig
from latentexplainer_plugin.data.shapes import AREA_MATCH, FACTOR_NAMES, ShapesSpec
from latentexplainer_plugin.data.shapes3 import SHAPES3, make_dataset, render
from latentexplainer_plugin.models.training import (
    TrainConfig,
    beta_from_normalized,
    capacity_at,
    choose_threads,
    default_train_config,
    free_bits_at,
    free_bits_kl,
    kl_weight,
    latent_report,
    tcvae_loss,
    train_vae,
)

# -- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("step, warmup, expected", [(0, 1000, 0.0), (250, 1000, 0.25), (999, 1000, 0.999),
                                                    (1000, 1000, 1.0), (5000, 1000, 1.0), (0, 0, 1.0), (7, 0, 1.0)])
def test_kl_warmup_is_linear_then_one(step, warmup, expected):
    assert kl_weight(step, warmup) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (400, 10.0), (1000, 25.0), (3000, 25.0)])
def test_capacity_rises_linearly_to_its_maximum(step, expected):
    assert capacity_at(step, 25.0, 1000) == pytest.approx(expected)
    assert capacity_at(step, 25.0, 0) == pytest.approx(25.0)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (500, 1.0), (800, 1.0), (1000, 0.75), (1200, 0.5), (1600, 0.0), (1999, 0.0)])
def test_free_bits_are_held_then_faded_out(step, expected):
    assert free_bits_at(step, 1.0, 1600) == pytest.approx(expected)
    assert free_bits_at(step, 0.5, 0) == pytest.approx(0.5)  # never faded


def test_free_bits_charge_at_least_lambda_per_latent():
    kl = torch.tensor([0.02, 0.3, 1.0])
    assert free_bits_kl(kl, 0.1).item() == pytest.approx(0.1 + 0.3 + 1.0)
    assert free_bits_kl(kl, 0.5).item() == pytest.approx(0.5 + 0.5 + 1.0)
    assert free_bits_kl(kl, 0.0).item() == pytest.approx(1.32)
    # a latent below lambda gets no gradient: the KL cost does not push it further down
    k = kl.clone().requires_grad_(True)
    free_bits_kl(k, 0.1).backward()
    assert k.grad.tolist() == [0.0, 1.0, 1.0]


def test_normalised_beta_scales_with_image_size_and_latents():
    assert beta_from_normalized(0.005, 64, 3, 10) == pytest.approx(0.005 * 64 * 64 * 3 / 10)  # 6.144
    assert beta_from_normalized(0.005, 64, 3, 5) == pytest.approx(12.288)
    assert beta_from_normalized(0.005, 32, 3, 5) == pytest.approx(3.072)  # a quarter of the pixels: a quarter of beta
    assert beta_from_normalized(0.005, 16, 1, 10) == 1.0  # never below 1
    with pytest.raises(ValueError, match="beta_norm must be a finite number >= 0"):
        beta_from_normalized(-1.0, 64, 3, 10)


def test_train_vae_defaults():
    cfg = default_train_config(64, 3, 10)
    assert (cfg.steps, cfg.batch_size, cfg.warmup_steps, cfg.kl, cfg.threads) == (6000, 64, 1500, "analytic", 0)
    assert cfg.beta == pytest.approx(6.144) and cfg.capacity == 0
    assert (cfg.free_bits, cfg.free_bits_steps) == (1.0, 4800)
    short = default_train_config(64, 3, 10, steps=100)
    assert (short.warmup_steps, short.free_bits_steps) == (25, 80)
    assert default_train_config(64, 3, 10, steps=100, warmup_steps=7).warmup_steps == 7
    # the field defaults are still the original recipe that train-demo uses
    legacy = TrainConfig()
    assert (legacy.kl, legacy.warmup_steps, legacy.free_bits, legacy.capacity, legacy.recon_scale) == ("sampled", 0, 0.0, 0.0, 1.0)


def test_cli_steps_default_is_the_trainers():
    # the parser keeps its own copy of the number (no torch import for --help); the two must agree
    from latentexplainer_plugin.cli.parser import build_parser

    args = build_parser().parse_args(["train-vae", "--data", "x.npz", "--out", "y"])
    assert args.steps == train_mod.DEFAULT_STEPS, "cli/parser.py DEFAULT_TRAIN_STEPS must equal models.training.DEFAULT_STEPS"


@pytest.mark.parametrize("kwargs, message", [
    ({"free_bits": 0.1}, "free_bits and capacity need kl='analytic'"),
    ({"kl": "mc"}, "kl must be one of sampled, analytic, got 'mc'"),
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
    ({"beta": float("nan")}, "beta must be a finite number >= 0, got nan"),
])
def test_bad_train_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**kwargs)


def test_choose_threads(monkeypatch):
    assert choose_threads(3) == 3
    monkeypatch.setattr(train_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(train_mod.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert choose_threads(0) == 2
    monkeypatch.setattr(train_mod.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert choose_threads(0) == 1
    monkeypatch.setattr(train_mod.os, "getloadavg", lambda: (6.0, 0.0, 0.0))
    assert choose_threads(0) == 1


# -- the loss ----------------------------------------------------------------------------------


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 4, 4, generator=g)
    recon = torch.rand(6, 3, 4, 4, generator=g).clamp(0.05, 0.95)
    mu = torch.randn(6, 3, generator=g)
    logvar = torch.randn(6, 3, generator=g) * 0.5
    z = mu + torch.randn(6, 3, generator=g) * (0.5 * logvar).exp()
    return x, recon, mu, logvar, z


def _by_hand(x, recon, mu, logvar):
    xn, rn, m, lv = (t.double().numpy() for t in (x, recon, mu, logvar))
    rec = -(xn * np.log(rn) + (1 - xn) * np.log(1 - rn)).sum() / len(xn)
    kl_d = (0.5 * (m**2 + np.exp(lv) - 1 - lv)).mean(0)
    return rec, kl_d


def test_analytic_loss_is_reconstruction_plus_weighted_kl(batch):
    x, recon, mu, logvar, z = batch
    rec, kl_d = _by_hand(x, recon, mu, logvar)
    cfg = TrainConfig(kl="analytic", beta=1.0, warmup_steps=100)
    loss, parts = tcvae_loss(x, recon, mu, logvar, z, 100, cfg, step=25)  # warm-up weight 0.25
    assert parts["recon"] == pytest.approx(rec, rel=1e-5) and parts["kl"] == pytest.approx(kl_d.sum(), rel=1e-5)
    assert loss.item() == pytest.approx(rec + 0.25 * kl_d.sum(), rel=1e-5)
    cfg = TrainConfig(kl="analytic", beta=1.0, free_bits=0.3, recon_scale=2.0)
    loss, _ = tcvae_loss(x, recon, mu, logvar, z, 100, cfg, step=10)
    assert loss.item() == pytest.approx(2 * rec + np.maximum(kl_d, 0.3).sum(), rel=1e-5)
    cfg = TrainConfig(kl="analytic", beta=1.0, free_bits=0.6, free_bits_steps=100)
    loss, parts = tcvae_loss(x, recon, mu, logvar, z, 100, cfg, step=75)  # faded to half: 0.3
    assert parts["free_bits"] == pytest.approx(0.3)
    assert loss.item() == pytest.approx(rec + np.maximum(kl_d, 0.3).sum(), rel=1e-5)
    cfg = TrainConfig(kl="analytic", beta=1.0, capacity=4.0, capacity_steps=100, capacity_weight=10.0)
    loss, parts = tcvae_loss(x, recon, mu, logvar, z, 100, cfg, step=50)
    assert parts["capacity"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(rec + 10.0 * abs(kl_d.sum() - 2.0), rel=1e-5)
    # beta > 1 adds (beta - 1) * TC on top of the KL
    cfg = TrainConfig(kl="analytic", beta=4.0)
    loss, parts = tcvae_loss(x, recon, mu, logvar, z, 100, cfg, step=10)
    assert loss.item() == pytest.approx(rec + kl_d.sum() + 3.0 * parts["tc"], rel=1e-5)


def test_sampled_loss_is_the_original_beta_tcvae_sum(batch):
    x, recon, mu, logvar, z = batch
    cfg = TrainConfig(beta=6.0)
    loss, p = tcvae_loss(x, recon, mu, logvar, z, 100, cfg, step=3)
    assert loss.item() == pytest.approx(p["recon"] + p["mi"] + 6.0 * p["tc"] + p["dwkl"], rel=1e-6)
    # MI + TC + dwKL is a sampled estimate of the KL: the same order of size as the closed form
    cfg = TrainConfig(beta=6.0, warmup_steps=10)
    warm, _ = tcvae_loss(x, recon, mu, logvar, z, 100, cfg, step=5)
    assert warm.item() == pytest.approx(p["recon"] + 0.5 * (p["mi"] + 6.0 * p["tc"] + p["dwkl"]), rel=1e-6)


# -- collapse: a run on constant images has nothing to encode -----------------------------------

TINY = ConvVAEConfig(latent_dim=4, image_size=16, channels=3, width=8, hidden=32)


def test_constant_images_collapse_and_are_reported(tmp_path):
    images = np.full((64, 16, 16, 3), 128, dtype=np.uint8)
    cfg = TrainConfig(steps=60, batch_size=16, lr=1e-2, kl="analytic", beta=1.0, threads=1)
    with pytest.warns(RuntimeWarning, match="collapse: only 0 of 4 latents carry information"):
        model, history = train_vae(images, TINY, cfg, progress=False, log_every=20)
    report = latent_report(model, images)
    assert report["n_active"] == 0 and report["active_latents"] == [] and report["collapsed"]
    assert all(kl < 0.05 for kl in report["kl_per_latent"]) and len(report["kl_per_latent"]) == 4
    assert "POSTERIOR COLLAPSE: only 0 of 4 latents are active" in report["warning"]
    assert "warmup_steps=" in report["warning"] and "free_bits=" in report["warning"] and "--" not in report["warning"]
    assert history[-1]["stopped_early"] is False and history[-1]["step"] == 59

    stopped = TrainConfig(steps=60, batch_size=16, lr=1e-2, kl="analytic", beta=1.0, threads=1, stop_on_collapse=True)
    with pytest.warns(RuntimeWarning):
        _, history = train_vae(images, TINY, stopped, progress=False, log_every=20)
    assert history[-1]["stopped_early"] is True and history[-1]["step"] == 6  # check at warm-up (0) + steps // 10


def test_cli_prints_and_saves_the_latent_report(tmp_path, capsys):
    images = np.full((32, 16, 16, 3), 90, dtype=np.uint8)
    factors = np.random.default_rng(0).uniform(size=(32, 2))
    np.savez(tmp_path / "flat.npz", images=images, factors=factors, factor_names=np.array(["a", "b"]))
    out = tmp_path / "model"
    with warnings.catch_warnings():  # the mid-run collapse warning may or may not fire by step 6; the report must
        warnings.simplefilter("ignore", RuntimeWarning)
        code = main(["train-vae", "--data", str(tmp_path / "flat.npz"), "--out", str(out), "--steps", "60", "--latents", "3",
                     "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "0", "--free-bits", "0", "--recon-scale", "0.1", "--threads", "1", "--quiet"])
    assert code == 0
    printed = capsys.readouterr()
    assert "active latents (KL > 0.05 nats): 0 of 3: none" in printed.out
    assert "z2: KL" in printed.out and "collapsed  captures nothing" in printed.out
    assert "POSTERIOR COLLAPSE: only 0 of 3 latents are active" in printed.err
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["collapsed"] is True and training["active_latents"] == [] and len(training["kl_per_latent"]) == 3
    assert training["warmup_steps"] == 0 and training["kl"] == "analytic" and training["threads_used"] == 1
    assert training["steps"] == 60 and training["batch_size"] == 8 and training["final"]["step"] == 59
    assert training["recon_scale"] == 0.1 and training["n_images"] == 32
    assert training["beta"] == pytest.approx(1.28) and training["beta_norm"] == 0.005  # 0.005 * 16*16*3 / 3
    assert [c["factor"] for c in training["captured"]] == [None, None, None]


class _KnownEncoder(nn.Module):
    """encode: mu0 = 4 * (mean brightness - 0.5), mu1 = 0, mu2 = 0; logvar = (0, 0, -1)."""

    def __init__(self):
        super().__init__()
        self.config = ConvVAEConfig(latent_dim=3, image_size=16, channels=3)
        self.latent_dim = 3

    def encode(self, x):
        b = x.mean(dim=(1, 2, 3))
        mu = torch.stack([4 * (b - 0.5), torch.zeros_like(b), torch.zeros_like(b)], 1)
        logvar = torch.tensor([0.0, 0.0, -1.0]).expand(len(b), 3)
        return mu, logvar


def test_active_latents_and_their_factors_are_reported():
    levels = np.linspace(0, 255, 50).round().astype(np.uint8)
    images = np.broadcast_to(levels[:, None, None, None], (50, 16, 16, 3)).copy()
    factors = np.stack([levels / 255.0, np.random.default_rng(1).uniform(size=50)], 1)
    report = latent_report(_KnownEncoder(), images, factors, ["brightness", "noise"])
    mu0 = 4 * (levels / 255.0 - 0.5)
    expected = [float(np.mean(0.5 * mu0**2)), 0.0, 0.5 * math.exp(-1.0)]
    assert report["kl_per_latent"] == pytest.approx(expected, abs=1e-4)
    assert report["active_latents"] == [0, 2] and report["n_active"] == 2 and not report["collapsed"]
    assert report["warning"] is None
    assert [c["factor"] for c in report["captured"]] == ["brightness", None, None]
    assert report["captured"][0]["nmi"] == pytest.approx(1.0, abs=0.01) and report["captured_factors"] == ["brightness"]


# -- bad input is refused before any training ---------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "train_vae", refuse)


@pytest.mark.parametrize("extra, message", [
    ([], "exists and is not a directory"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--warmup-steps", "-5"], "warmup_steps must be >= 0, got -5"),
    (["--beta-norm", "-1"], "beta_norm must be a finite number >= 0, got -1.0"),
    (["--free-bits", "nan"], "free_bits must be a finite number >= 0, got nan"),
])
def test_bad_train_vae_input_fails_before_training(tmp_path, capsys, no_training, extra, message):
    np.savez(tmp_path / "d.npz", **make_dataset(4, ShapesSpec(size=16)))
    target = tmp_path / "model.txt" if not extra else tmp_path / "m"
    (tmp_path / "model.txt").write_text("not a model")
    assert main(["train-vae", "--data", str(tmp_path / "d.npz"), "--out", str(target), *extra]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "model.txt").read_text() == "not a model"


def test_out_under_a_file_is_refused(tmp_path, capsys, no_training):
    np.savez(tmp_path / "d.npz", **make_dataset(4, ShapesSpec(size=16)))
    (tmp_path / "f").write_text("x")
    assert main(["train-vae", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "f" / "model")]) == 2
    assert "is a file, so no directory can be made under it" in capsys.readouterr().err


# -- shapes3: the factors are what the spec says --------------------------------------------------


def _background(spec, b, size):
    y = (np.arange(size) + 0.5) / size
    return np.clip(b * np.asarray(spec.tint)[None, :] + spec.gradient * (0.5 - y)[:, None], 0, 1)  # (size, 3)


@pytest.mark.parametrize("shape", [0, 1, 2])
def test_shapes3_renders_its_factors(shape):
    spec = SHAPES3
    rows = np.array([[shape, 0.35, 0.62, 0.16, 0.0, 0.3, 0.25], [shape, 0.7, 0.3, 0.11, 20.0, 0.55, 0.45]])
    images = render(rows).astype(float) / 255.0
    assert images.shape == (2, 64, 64, 3)
    for img, (_, x, y, s, _, hue, b) in zip(images, rows):
        bg = _background(spec, b, 64)
        assert np.allclose(img[:, 0], bg, atol=1 / 255 + 1e-9)  # left column: background only
        assert bg[0].mean() < bg[-1].mean()  # darker at the top
        obj = np.abs(img - bg[:, None, :]).max(-1) > 0.05
        cy, cx = np.argwhere(obj).mean(0)
        # an equilateral-ish triangle's centroid sits below its bounding centre: allow a few pixels there
        tol = 4.0 if spec.shapes[shape] == "triangle" else 1.0
        assert abs((cx + 0.5) / 64 - x) * 64 < 1.0 and abs((cy + 0.5) / 64 - y) * 64 < tol
        colour = np.array(colorsys.hsv_to_rgb(hue, 0.6, 0.85))
        diff = colour[None, None, :] - bg[:, None, :]
        cover = np.clip(((img - bg[:, None, :]) * diff).sum(-1) / (diff**2).sum(-1), 0, 1)  # anti-aliased coverage
        assert cover.sum() / 64**2 == pytest.approx(2.4 * s**2, rel=0.05)  # AREA_MATCH gives every shape area 2.4 s^2
        centre = img[int(y * 64), int(x * 64)] if spec.shapes[shape] != "triangle" else img[int(y * 64) + 2, int(x * 64)]
        assert np.allclose(centre, colour, atol=1 / 255 + 1e-9)
    assert set(AREA_MATCH) >= set(spec.shapes)


def test_make_data_writes_shapes3_within_its_ranges(tmp_path):
    assert main(["make-data", "--dataset", "shapes3", "--n", "200", "--seed", "2", "--out", str(tmp_path / "s3.npz")]) == 0
    with np.load(tmp_path / "s3.npz") as f:
        assert list(f["factor_names"]) == list(FACTOR_NAMES) and list(f["shape_names"]) == ["ellipse", "cross", "triangle"]
        fac = f["factors"]
        assert f["images"].shape == (200, 64, 64, 3)
    ranges = [(0, 2), SHAPES3.x_range, SHAPES3.y_range, SHAPES3.scale_range, SHAPES3.rotation_range,
              SHAPES3.hue_range, SHAPES3.background_range]
    for k, (lo, hi) in enumerate(ranges):
        assert fac[:, k].min() >= lo and fac[:, k].max() <= hi, FACTOR_NAMES[k]
    assert set(np.unique(fac[:, 0])) == {0.0, 1.0, 2.0}


def test_training_restores_the_callers_thread_count():
    import numpy as np
    import torch

    from latentexplainer_plugin.models.conv_vae import ConvVAEConfig
    from latentexplainer_plugin.models.training import TrainConfig, train_vae

    before = torch.get_num_threads()
    images = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    train_vae(images, ConvVAEConfig(latent_dim=2, image_size=16, width=8, hidden=16),
              TrainConfig(steps=1, batch_size=4, threads=2 if before == 1 else 1), progress=False)
    assert torch.get_num_threads() == before
