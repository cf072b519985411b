"""Rank, then explain: captum methods attribute a score of the generated image to the latents.

Known answers come from a linear decoder whose columns have known sums: with score = sum of
pixels, d score / d z_i is the i-th column sum, so every method must rank the latents by it.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from latentexplainer_plugin import LatentExplainer, LatentScore, RankThenExplain, TraversalSensitivity, rank_latents
from latentexplainer_plugin.adapters.vae import VAEAdapter
from latentexplainer_plugin.ranking import (
    RankedLatents, attribution_methods, check_method_spec, make_method, resolve_score,
)
from latentexplainer_plugin.cli.explain import check_ranking_flags

ROOT = Path(__file__).resolve().parents[1]
COLUMN_SUMS = torch.tensor([3.0, 1.0, 8.0, 0.5, 5.0])  # expected order: z2, z4, z0, z1, z3
EXPECTED = [2, 4, 0, 1, 3]


class LinearVAE(nn.Module):
    """decode(z) = W z reshaped to a (1, 16, 16) image; column i of W sums to COLUMN_SUMS[i]."""

    latent_dim = 5

    def __init__(self, pre_scale: float | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w = torch.rand(256, 5, generator=g) + 0.1
        w = w / w.sum(0, keepdim=True) * COLUMN_SUMS
        linear = nn.Linear(5, 256, bias=False)
        linear.weight.data = w
        layers = ([Scale(pre_scale)] if pre_scale is not None else []) + [linear, nn.Unflatten(1, (1, 16, 16))]
        self.decoder = nn.Sequential(*layers)

    def decode(self, z):
        return self.decoder(z)


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def pixel_sum(images):
    return images.flatten(1).sum(1)


def hand_fd_ranking(model, bases, delta=0.5):
    """Central finite differences of the score, by hand: mean |S(z + d e_i) - S(z - d e_i)| / 2d."""
    with torch.no_grad():
        sens = []
        for i in range(bases.shape[1]):
            e = torch.zeros(bases.shape[1])
            e[i] = delta
            sens.append(((pixel_sum(model.decode(bases + e)) - pixel_sum(model.decode(bases - e))).abs() / (2 * delta)).mean())
    return [int(i) for i in torch.argsort(torch.stack(sens), descending=True, stable=True)]


@pytest.fixture
def linear():
    model = LinearVAE()
    return model, VAEAdapter(model, output_range=(-100.0, 100.0))


@pytest.fixture(scope="module")
def vae():
    """The shipped demo VAE when its weights are present, else a tiny untrained ConvVAE."""
    from latentexplainer_plugin.demo import WEIGHTS_DIR, load_demo_model
    from latentexplainer_plugin.models.conv_vae import ConvVAE, ConvVAEConfig

    if (WEIGHTS_DIR / "model.safetensors").is_file():
        return load_demo_model()
    torch.manual_seed(0)
    return ConvVAE(ConvVAEConfig(latent_dim=4, image_size=16, width=8, hidden=32)).eval()


# -- the known answer ------------------------------------------------------------------------------

@pytest.mark.parametrize("method, kwargs", [
    ("IntegratedGradients", {"n_steps": 16}),
    ("FeatureAblation", {}),
    ("NoiseTunnel(IntegratedGradients)", {"nt_samples": 4, "stdevs": 0.1, "n_steps": 8}),
    ("Saliency", {}),
    ("ShapleyValueSampling", {"n_samples": 4}),
    ("TraversalSensitivity", {}),
])
def test_every_method_matches_the_hand_computed_finite_difference_ranking(linear, method, kwargs):
    model, adapter = linear
    bases = torch.ones(6, 5) + 0.1 * torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    assert hand_fd_ranking(model, bases) == EXPECTED
    ranking = rank_latents(adapter, pixel_sum, method, bases, **kwargs)
    assert ranking.order == EXPECTED
    assert ranking.method == method
    assert [ranking.rank_of(i) for i in EXPECTED] == [1, 2, 3, 4, 5]


def test_integrated_gradients_values_and_convergence_delta_are_exact_on_a_linear_decoder(linear):
    model, adapter = linear
    bases = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    ranking = rank_latents(adapter, pixel_sum, "IntegratedGradients", bases, n_steps=8)
    scale = 200.0  # output_range (-100, 100): images are (x + 100) / 200, pixel_sum is linear in z
    expected = bases * COLUMN_SUMS / scale  # IG from z = 0: z_i * d S / d z_i
    torch.testing.assert_close(ranking.attributions, expected, rtol=1e-4, atol=1e-6)
    assert ranking.delta is not None and ranking.delta.shape == (4,)
    assert ranking.mean_abs_delta < 1e-5


def test_a_site_inside_the_decoder_is_attributed_through_nnsight():
    # site = input of the linear layer = 2 z: the activation is captured and replaced through nnsight
    model = LinearVAE(pre_scale=2.0)
    adapter = VAEAdapter(model, site="decoder.1.input", output_range=(-100.0, 100.0))
    bases = torch.ones(3, 5)
    ranking = rank_latents(adapter, pixel_sum, "IntegratedGradients", bases, n_steps=8)
    assert ranking.order == EXPECTED
    torch.testing.assert_close(ranking.attributions, 2 * bases * COLUMN_SUMS / 200.0, rtol=1e-4, atol=1e-6)


# -- the VAE: each method gives a ranking --------------------------------------------------------

@pytest.mark.parametrize("method, kwargs", [
    ("IntegratedGradients", {"n_steps": 16}),
    ("FeatureAblation", {}),
    ("NoiseTunnel(IntegratedGradients)", {"nt_samples": 3, "stdevs": 0.2, "n_steps": 8}),
])
def test_each_method_ranks_the_latents_of_the_vae(vae, method, kwargs):
    adapter = VAEAdapter(vae)
    ranking = rank_latents(adapter, "mean", method, n_bases=4, **kwargs)
    d = adapter.n_latents
    assert sorted(ranking.order) == list(range(d))
    assert ranking.attributions.shape == (4, d) and torch.isfinite(ranking.attributions).all()
    assert (ranking.importance >= 0).all() and ranking.importance.max() > 0
    assert (ranking.delta is not None) == ("IntegratedGradients" in method)
    again = rank_latents(adapter, "mean", method, n_bases=4, **kwargs)  # seeded: repeatable
    assert again.order == ranking.order


def test_traversal_sensitivity_composes_with_noise_tunnel(vae):
    from captum.attr import NoiseTunnel

    adapter = VAEAdapter(vae)
    z = adapter.sample_bases(3)
    plain = TraversalSensitivity(adapter.driver).attribute(z)
    assert plain.shape == (3, adapter.n_latents)
    exact = NoiseTunnel(TraversalSensitivity(adapter.driver)).attribute(z, nt_samples=2, stdevs=0.0)
    torch.testing.assert_close(exact, plain)  # no noise: the tunnel's average is the method itself
    smooth = NoiseTunnel(TraversalSensitivity(adapter.driver)).attribute(z, nt_samples=3, stdevs=0.3)
    assert smooth.shape == plain.shape and not torch.equal(smooth, plain)


# -- methods by name, class, factory, instance -------------------------------------------------------

def test_methods_by_name_class_factory_and_instance(linear):
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    _, adapter = linear
    bases = torch.ones(2, 5)
    f = LatentScore(adapter, pixel_sum)
    by_class = rank_latents(adapter, pixel_sum, Saliency, bases)
    by_factory = rank_latents(adapter, pixel_sum, lambda fn: NoiseTunnel(Saliency(fn)), bases, nt_samples=2, stdevs=0.05)
    by_instance = rank_latents(adapter, pixel_sum, IntegratedGradients(f), bases, n_steps=4)
    assert by_class.order == by_factory.order == by_instance.order == EXPECTED
    assert by_factory.method == "NoiseTunnel(Saliency)"
    assert "IntegratedGradients" in attribution_methods() and "TraversalSensitivity" in attribution_methods()
    assert "Attribution" not in attribution_methods()


def test_bad_methods_and_scores_say_what_to_do(linear):
    from captum.attr import IntegratedGradients

    _, adapter = linear
    with pytest.raises(ValueError, match="unknown attribution method 'IntegratedGradient'.*IntegratedGradients"):
        check_method_spec("IntegratedGradient")
    with pytest.raises(ValueError, match=r"NoiseTunnel\(IntegratedGradients\)"):
        check_method_spec("NoiseTunnel")
    with pytest.raises(ValueError, match="does not wrap"):
        check_method_spec("Saliency(IntegratedGradients)")
    with pytest.raises(ValueError, match="LatentScore"):
        make_method(IntegratedGradients(lambda z: z.sum(1)), LatentScore(adapter))
    with pytest.raises(TypeError, match="takes no n_step"):
        rank_latents(adapter, pixel_sum, "IntegratedGradients", torch.ones(2, 5), n_step=3)
    with pytest.raises(ValueError, match="one number per image"):
        rank_latents(adapter, lambda x: x, "Saliency", torch.ones(2, 5))
    with pytest.raises(ValueError, match="module:function"):
        resolve_score("brightness")
    assert resolve_score("latentexplainer_plugin.ranking:contrast")[1] == "latentexplainer_plugin.ranking:contrast"
    with pytest.raises(ValueError, match="--rank-by"):
        check_ranking_flags(None, None, 3)


# -- rank, then explain ----------------------------------------------------------------------------

def test_rank_then_explain_explains_the_top_k_in_rank_order(linear):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    _, adapter = linear
    explainer = LatentExplainer(adapter, samples=3, similarity="bow")
    rte = RankThenExplain(explainer, score=pixel_sum, method="IntegratedGradients")
    results = rte.attribute(top_k=2, n_steps=8)
    assert [r.index for r in results] == EXPECTED[:2]
    assert isinstance(results.ranking, RankedLatents) and results.ranking.order == EXPECTED
    for rank, r in enumerate(results, 1):
        assert r.rank == rank and r.attribution == pytest.approx(float(results.ranking.importance[r.index]), rel=1e-5)
        assert r.delta is not None and r.delta < 1e-4
        assert r.status == "ok" and r.certainty is not None and r.traversal is not None
        entry = r.to_json("strips/x.png")
        assert entry["rank"] == rank and entry["attribution_method"] == "IntegratedGradients"
    assert "#1 z2" in repr(results)
    assert "<th>rank</th>" in results._repr_html_() and "<th>rank</th>" in results.ranking._repr_html_()
    assert isinstance(results.plot(), Figure) and isinstance(results.ranking.plot(), Figure)
    assert results.info["ranking"]["order"][:2] == ["z2", "z4"]


# -- diffusion: attribute to the strengths of h-space directions ------------------------------------

def test_ddpm_direction_strengths_get_the_gradient_of_the_score():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    from latentexplainer_plugin.adapters.diffusion import DDPMAdapter

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    adapter = DDPMAdapter(unet, steps=3, calibration_samples=2, scale=1.0)
    adapter.set_directions(torch.randn(3, *adapter.h_shape(), generator=torch.Generator().manual_seed(0)))
    noises = adapter.sample_bases(2)
    ranking = rank_latents(adapter, "mean", "Saliency", noises, alpha=0.0)
    assert ranking.attributions.shape == (2, 3)
    # Saliency = |d score / d alpha_k| at alpha = 0; check against central differences of the sampler
    f = LatentScore(adapter, "mean")
    alpha, extra, _ = f.prepare(noises)
    alpha = torch.zeros_like(alpha)
    eps = 1e-2
    with torch.no_grad():
        for k in range(3):
            e = torch.zeros(3)
            e[k] = eps
            fd = (f(alpha + e, *extra) - f(alpha - e, *extra)) / (2 * eps)
            torch.testing.assert_close(ranking.attributions[:, k], fd.abs(), rtol=0.05, atol=1e-5)
    ig = rank_latents(adapter, "mean", "IntegratedGradients", noises, n_steps=4)
    assert sorted(ig.order) == [0, 1, 2] and ig.delta is not None and ig.info["alpha"] == 1.0


# -- command line ------------------------------------------------------------------------------------

def test_cli_rank_by_top_k_writes_ranks_and_heat_maps(tmp_path, vae, capsys):
    from latentexplainer_plugin.cli import main

    model_dir = vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    code = main(["explain", "--model", str(model_dir), "--out", str(out), "--samples", "3", "--similarity", "bow",
                 "--rank-by", "IntegratedGradients", "--top-k", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["ranking"]["method"] == "IntegratedGradients" and data["ranking"]["score"] == "mean"
    assert sorted(e["rank"] for e in data["latents"]) == [1, 2]
    assert {e["id"] for e in data["latents"]} == set(data["ranking"]["order"][:2])
    for e in data["latents"]:
        assert (out / e["heatmap"]).is_file() and e["delta"] is not None
    report = (out / "report.html").read_text()
    assert "IntegratedGradients of score" in report and "heatmaps/" in report
    bad = main(["explain", "--model", str(model_dir), "--out", str(tmp_path / "bad"), "--top-k", "2"])
    assert bad == 2 and "--rank-by" in capsys.readouterr().err
    bad = main(["explain", "--model", str(model_dir), "--out", str(tmp_path / "bad"), "--rank-by", "Gradients"])
    assert bad == 2 and "unknown attribution method" in capsys.readouterr().err


# -- docs/captum.md runs as written ------------------------------------------------------------------

def test_docs_captum_examples_run(monkeypatch, capsys, vae):
    import latentexplainer_plugin
    from latentexplainer_plugin.demo import WEIGHTS_DIR

    text = (ROOT / "docs" / "captum.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)  # "```python no-run" blocks need a hub model
    assert len(blocks) >= 3
    if not (WEIGHTS_DIR / "model.safetensors").is_file():  # no shipped weights in this checkout: a tiny stand-in
        monkeypatch.setattr(latentexplainer_plugin, "load_demo_model", lambda device="cpu": vae, raising=False)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/captum.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert re.search(r"z\d+: attribution \d", printed)
    assert "RankedLatents(IntegratedGradients" in printed and "#1 z" in printed
