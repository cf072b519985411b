"""SAE features as the latents of sampling-loop adapters (ddpm, sd, dit, ...): steering on every step of
the edit window, both guidance halves alike, checked against torch forward hooks written out by hand.

A tiny random UNet2DModel (16x16 images, mid block (B, 32, 8, 8)), 3 DDIM steps (timesteps 666,
333, 0) with t_edit=300: the first two steps are edited, the last is not. Every reference runs the
adapter's plain sampler (no nnsight; it equals the diffusers pipelines in test_diffusion.py and
test_transformer_diffusion.py) with a forward hook that applies the edit formula itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDIMPipeline, UNet2DModel
from safetensors.torch import save_file

from latentexplainer_plugin import LatentExplainer
from latentexplainer_plugin.adapters.diffusion import DDPMAdapter
from latentexplainer_plugin.cli import main
from latentexplainer_plugin.sae import SAEFeatureAdapter, SparseAutoencoder

STEPS = 3
WINDOW = {0, 1}  # t_edit=300 edits the calls at t=666 and t=333
TOL = 1e-5
SHIFT = 100.0  # b_dec = -SHIFT keeps the axis SAE's features active: f_k = h_k + SHIFT > 0 (|h| is ~3)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()


@pytest.fixture(scope="module")
def ddpm(unet):
    return DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=STEPS, t_edit=300, max_batch=64)


def topk_sae(d_in, d_sae=48, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SparseAutoencoder(torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, 0.1 * torch.randn(d_sae, generator=g),
                             torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5, 0.1 * torch.randn(d_in, generator=g),
                             "topk", k=k)


def axis_sae(d):
    eye = torch.eye(d)
    return SparseAutoencoder(eye, torch.zeros(d), eye.clone(), torch.full((d,), -SHIFT), "standard")


def write_saelens(folder, sae, hook_name=None):
    """``sae`` in SAELens layout (cfg.json + sae_weights.safetensors), written by hand from its documented keys."""
    folder.mkdir()
    save_file({"W_enc": sae.W_enc.data, "b_enc": sae.b_enc.data, "W_dec": sae.W_dec.data, "b_dec": sae.b_dec.data},
              str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae}
    if sae.k is not None:
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    if hook_name:
        cfg["metadata"] = {"hook_name": hook_name}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def encode_by_hand(h, sae):
    """f(h) for vectors h (..., d_in): the SAE's encoder written out (standard ReLU, or topk)."""
    pre = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)
    if sae.architecture == "topk":
        kept = pre.topk(sae.k, dim=-1)
        pre = torch.zeros_like(pre).scatter(-1, kept.indices, kept.values)
    return pre


def mean_activations_by_hand(ddpm, module, bases, sae):
    """Per base, each feature's mean activation over the positions of ``module``'s output (B, C, H, W) and
    every sampling step, read with a forward hook: (n bases, d_sae)."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        ddpm.sample(bases)
    finally:
        handle.remove()
    h = torch.stack(seen, dim=1).movedim(2, -1)  # (n, steps, H, W, C)
    return encode_by_hand(h, sae).flatten(1, 3).mean(1)


def steer_by_hand(h, sae, k, a):
    """h (..., d_in) vectors: h + (a - f_k(h)) W_dec[k], f from the SAE's encoder written out (standard or topk)."""
    return h + (a - encode_by_hand(h, sae)[..., k:k + 1]) * sae.W_dec[k]


def sample_with_hook(adapter, module, bases, edit_vectors):
    """Plain sampling with a forward hook on ``module``: on the calls in WINDOW the output (every
    guidance copy) becomes ``edit_vectors(out)``; returns images in [0, 1] and the number of calls."""
    calls = []

    def hook(mod, args, out):
        calls.append(1)
        return edit_vectors(out) if len(calls) - 1 in WINDOW else out

    handle = module.register_forward_hook(hook)
    try:
        images = adapter.sample(bases)
    finally:
        handle.remove()
    return images, len(calls)


def channels_last(fn):
    """Apply a per-vector edit to a (B, C, H, W) map along C."""
    return lambda out: fn(out.movedim(1, -1)).movedim(-1, 1)


def test_ddpm_feature_steering_equals_a_torch_hook_on_every_edited_step(ddpm, unet):
    sae = topk_sae(32)
    adapter = SAEFeatureAdapter(ddpm, sae, features=[3, 17], strengths="absolute", stats_bases=4)
    assert adapter.stats_bases == 4 and str(adapter.site) == "mid_block.output"
    bases = ddpm.sample_bases(2, seed=5)
    strengths = torch.tensor([0.0, 2.0, 6.0])
    traversals = adapter.traverse([0, 1], bases, strengths)
    for t, k in zip(traversals, (3, 17)):
        assert t.images.shape == (2, 1, 3, 3, 16, 16) and t.rule == "sae" and t.latent_id == f"f{k}"
        for j, a in enumerate(strengths.tolist()):
            want, calls = sample_with_hook(ddpm, unet.mid_block, bases,
                                           channels_last(lambda h, k=k, a=a: steer_by_hand(h, sae, k, a)))
            assert calls == STEPS
            assert (t.images[:, 0, j] - want).abs().max().item() <= TOL
        assert (t.images[:, 0, 2] - t.images[:, 0, 0]).abs().max().item() > 0.05  # the feature's strength shows


def test_axis_sae_in_a_sampling_loop_sets_the_channel_on_the_edited_steps_only(ddpm, unet):
    adapter = SAEFeatureAdapter(ddpm, axis_sae(32), features=[5], strengths="absolute", stats_bases=2)
    bases = ddpm.sample_bases(2, seed=7)
    values = torch.tensor([-4.0, 0.0, 4.0])
    (t,) = adapter.traverse([0], bases, values + SHIFT)

    def set_channel(value):
        def edit(out):
            out = out.clone()
            out[:, 5] = value
            return out
        return edit

    for j, value in enumerate(values.tolist()):
        want, _ = sample_with_hook(ddpm, unet.mid_block, bases, set_channel(value))
        assert (t.images[:, 0, j] - want).abs().max().item() <= TOL
    # the third step (t=0) is outside the window: setting the channel there too gives other images
    every_step = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: set_channel(4.0)(out))
    try:
        every_step = ddpm.sample(bases)
    finally:
        handle.remove()
    assert (t.images[:, 0, 2] - every_step).abs().max().item() > 1e-3


def test_guidance_halves_are_steered_alike_in_stable_diffusion():
    from latentexplainer_plugin.adapters.stable_diffusion import StableDiffusionAdapter
    try:
        from tests.tiny_sd import tiny_sd_parts
    except ImportError:  # tests/ on sys.path instead of the repository root
        from tiny_sd import tiny_sd_parts  # type: ignore

    parts = tiny_sd_parts()
    block = "down_blocks.0.attentions.0.transformer_blocks.0"  # (B, 64 tokens, 16): SAEs on SD read blocks like it
    sd = StableDiffusionAdapter(parts["unet"], DDIMScheduler(), vae=parts["vae"], text_encoder=parts["text_encoder"],
                                tokenizer=parts["tokenizer"], prompt="a photo of a face", guidance_scale=5.0, steps=STEPS,
                                t_edit=300)
    assert sd.copies == 2
    sae = topk_sae(16, d_sae=24, k=3, seed=2)
    adapter = SAEFeatureAdapter(sd, sae, site=f"{block}.output", features=[1], strengths="absolute", stats_bases=2)
    bases = sd.sample_bases(2, seed=3)
    strengths = torch.tensor([0.0, 3.0])
    (t,) = adapter.traverse([0], bases, strengths)
    module = sd.unet.get_submodule(block)
    for j, a in enumerate(strengths.tolist()):
        want, calls = sample_with_hook(sd, module, bases, lambda h, a=a: steer_by_hand(h, sae, 1, a))
        assert calls == STEPS  # one call per step: both guidance halves are in that call's batch
        assert (t.images[:, 0, j] - want).abs().max().item() <= TOL
    assert (t.images[:, 0, 1] - t.images[:, 0, 0]).abs().max().item() > 0.01


def test_statistics_are_peaks_over_positions_and_edited_steps(ddpm, unet):
    sae = topk_sae(32, seed=4)
    adapter = SAEFeatureAdapter(ddpm, sae, features=[0, 9, 30], stats_bases=3, stats_seed=11)
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        ddpm.sample(ddpm.sample_bases(3, seed=11))
    finally:
        handle.remove()
    window = torch.stack([seen[i] for i in sorted(WINDOW)], dim=1)  # (3 bases, 2 steps, 32, 8, 8)
    h = window.movedim(2, -1)  # (3, 2, 8, 8, 32)
    acts = encode_by_hand(h, sae)[..., [0, 9, 30]]
    peak = acts.flatten(1, 3).amax(dim=1)  # (3 bases, 3 features): over steps and positions
    stats = adapter.stats
    assert torch.allclose(stats["max"], peak.amax(dim=0), rtol=1e-4, atol=1e-5)
    assert torch.allclose(stats["frequency"], (peak > 0).float().mean(0))
    assert torch.allclose(stats["position_frequency"], (acts > 0).float().flatten(0, 3).mean(0), atol=1e-6)


def test_a_dead_feature_leaves_the_samples_unchanged_and_is_never_clear(ddpm):
    sae = topk_sae(32, seed=6)
    with torch.no_grad():
        sae.b_enc[7] = -1e4  # feature 7 never fires
    adapter = SAEFeatureAdapter(ddpm, sae, features=[7], stats_bases=4)
    assert adapter.dead_latents() == [0]
    bases = ddpm.sample_bases(2, seed=8)
    (t,) = adapter.traverse([0], bases, [0.0, 1.0])
    assert t.strengths.tolist() == [0.0, 0.0, 0.0, 0.0] and t.meta["dead"] is True
    plain = ddpm.sample(bases)
    for j in range(4):
        assert (t.images[:, 0, j] - plain).abs().max().item() <= TOL
    (result,) = LatentExplainer(adapter, backend="offline", samples=3).attribute(target=[0])
    assert result.clear is False and result.explanation is None


def test_cli_explains_sae_features_of_a_saved_ddpm_pipeline(unet, tmp_path, capsys):
    pipe_dir = tmp_path / "ddpm"
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(pipe_dir)
    sae_dir = write_saelens(tmp_path / "sae", topk_sae(32), "mid_block.output")
    out = tmp_path / "run"
    code = main(["explain", "--model", str(pipe_dir), "--sae", str(sae_dir), "--features", "3,17", "--steps", "3",
                 "--t-edit", "300", "-o", "stats_bases=3", "--samples", "3", "--out", str(out), "--quiet"])
    assert code in (0, 1), capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["adapter"]["name"] == "sae" and data["adapter"]["inner"]["name"] == "ddpm"
    assert data["adapter"]["site"] == "mid_block.output" and data["adapter"]["stats_bases"] == 3
    assert [e["id"] for e in data["latents"]] == ["f3", "f17"]
    for entry in data["latents"]:
        assert entry["status"] == "ok" and (out / entry["strip"]).is_file()
        assert entry["feature"] in (3, 17) and isinstance(entry["dead"], bool)
    assert "directions" not in data  # SAE features, not PCA directions: no finder ran


def test_cli_refuses_sae_for_an_adapter_that_cannot_steer(tmp_path, capsys):
    sae_dir = write_saelens(tmp_path / "sae", SparseAutoencoder.identity(4))
    code = main(["explain", "--model", str(tmp_path / "missing"), "--adapter", "vlm", "--sae", str(sae_dir),
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--sae: the vlm adapter cannot steer a feature at a site" in err, err
    assert "ddpm" in err and "vae" in err  # the adapters that can, from their declarations


def test_sae_train_collects_every_step_of_a_sampling_loop_then_explain_steers_it(unet, tmp_path, capsys):
    from latentexplainer_plugin.sae.collect import ActivationStore

    pipe_dir = tmp_path / "ddpm"
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(pipe_dir)
    sae_dir = tmp_path / "sae"
    code = main(["sae-train", "--model", str(pipe_dir), "--out", str(sae_dir), "--n-features", "16", "-k", "2",
                 "--steps", "20", "--samples", "6", "--batch-size", "4", "-o", "steps=3", "-o", "t_edit=300"])
    assert code == 0, capsys.readouterr().err
    store = ActivationStore(sae_dir / "activations")
    m = store.manifest
    assert (m.site, m.calls, m.n_items, m.d_in, m.positions) == ("mid_block.output", STEPS, 6, 32, [8, 8])
    assert m.count == 6 * STEPS * 64  # every step of every sample, one row per position
    # the rows of item 5 at the last step equal the mid block's output there, read with a torch hook
    seen = []
    handle = unet.mid_block.register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
    try:
        DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=STEPS).sample(
            DDPMAdapter(unet, steps=STEPS).sample_bases(6, seed=0))
    finally:
        handle.remove()
    rows = [(a, i, c) for a, i, c in _rows(store) if i == 5 and c == STEPS - 1]
    assert len(rows) == 64
    got = torch.stack([a for a, _, _ in rows])  # (64 positions, 32)
    want = seen[-1][5].flatten(1).T  # (8*8, 32), positions row-major
    assert (got - want).abs().max().item() <= 1e-5

    out = tmp_path / "run"
    code = main(["explain", "--model", str(pipe_dir), "--sae", str(sae_dir), "--features", "0,1", "--steps", "3",
                 "--t-edit", "300", "-o", "stats_bases=2", "--samples", "3", "--out", str(out), "--quiet"])
    assert code in (0, 1), capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["adapter"]["site"] == "mid_block.output" and [e["id"] for e in data["latents"]] == ["f0", "f1"]


def _rows(store):
    """(activation, item, call) for every row of a collection, read shard by shard with safetensors."""
    from safetensors.torch import load_file

    for shard in store.manifest.shards:
        tensors = load_file(str(store.directory / shard["file"]))
        for a, i, c in zip(tensors["activations"], tensors["item"].tolist(), tensors["call"].tolist()):
            yield a, i, c


# -- ranking features: captum attributions of a score, or firing frequency
def test_saliency_of_axis_features_equals_the_decoder_gradient_by_hand():
    from captum.attr import Saliency

    from latentexplainer_plugin.adapters.vae import VAEAdapter
    from latentexplainer_plugin.demo import load_demo_model
    from latentexplainer_plugin.ranking import rank_latents

    demo = load_demo_model()
    inner = VAEAdapter(demo)
    adapter = SAEFeatureAdapter(inner, SparseAutoencoder(torch.eye(10), torch.zeros(10), torch.eye(10), torch.full((10,), -4.0)),
                                stats_bases=64)
    bases = inner.sample_bases(3, seed=2)
    ranking = rank_latents(adapter, "red", Saliency, bases, abs=False)
    top = adapter.stats["max"]  # axis SAE: feature k moves z_k by alpha * max_k
    z = (bases + top).requires_grad_(True)  # alpha = 1 for every feature
    demo.decode(z).clamp(0, 1)[:, 0].flatten(1).mean(1).sum().backward()
    want = z.grad * top
    assert torch.allclose(ranking.attributions, want, atol=1e-5, rtol=1e-4)
    assert ranking.ids == [f"f{k}" for k in range(10)] and ranking.method == "Saliency"


def test_integrated_gradients_rank_features_through_every_sampling_step(ddpm):
    from latentexplainer_plugin.ranking import rank_latents

    adapter = SAEFeatureAdapter(ddpm, topk_sae(32), features=[3, 17, 20], stats_bases=4)
    bases = ddpm.sample_bases(2, seed=9)
    alphas, extra, baselines = adapter.latent_coordinates(bases)
    assert alphas.shape == (2, 3) and baselines.abs().max() == 0
    with torch.no_grad():  # alpha = 0: no edit, the plain samples
        assert (adapter.images_at(baselines, *extra) - ddpm.sample(bases)).abs().max().item() <= TOL
    ranking = rank_latents(adapter, "mean", "IntegratedGradients", bases, n_steps=8)
    assert ranking.attributions.shape == (2, 3) and torch.isfinite(ranking.attributions).all()
    assert ranking.attributions.abs().max() > 0
    # completeness: the attributions of each base add up to score(alpha=1) - score(alpha=0), up to IG's delta
    with torch.no_grad():
        gap = adapter.images_at(alphas, *extra).flatten(1).mean(1) - adapter.images_at(baselines, *extra).flatten(1).mean(1)
    assert torch.allclose(ranking.attributions.sum(1), gap, atol=float(ranking.delta.abs().max()) + 1e-5)


def test_frequency_ranking_and_the_cli_top_k(tmp_path, capsys):
    from latentexplainer_plugin.adapters.vae import VAEAdapter
    from latentexplainer_plugin.demo import WEIGHTS_DIR, load_demo_model
    from latentexplainer_plugin.ranking import rank_by_frequency

    sae = topk_sae(10, d_sae=12, k=2, seed=3)
    adapter = SAEFeatureAdapter(VAEAdapter(load_demo_model()), sae, stats_bases=64)
    ranking = rank_by_frequency(adapter)
    frequency = adapter.stats["frequency"]
    assert [frequency[i] for i in ranking.order] == sorted(frequency.tolist(), reverse=True)
    sae_dir = write_saelens(tmp_path / "sae", sae, "decoder.input")
    out = tmp_path / "run"
    code = main(["explain", "--model", str(WEIGHTS_DIR), "--sae", str(sae_dir), "--rank-by", "frequency", "--top-k", "3",
                 "-o", "stats_bases=64", "--samples", "3", "--out", str(out), "--quiet"])
    assert code in (0, 1), capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["ranking"]["method"] == "frequency"
    assert data["ranking"]["order"] == [f"f{i}" for i in ranking.order]
    assert {e["id"]: e["rank"] for e in data["latents"]} == {f"f{i}": r for r, i in enumerate(ranking.order[:3], 1)}
    code = main(["explain", "--model", str(WEIGHTS_DIR), "--rank-by", "frequency", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2 and "--rank-by frequency ranks SAE features" in capsys.readouterr().err


def test_example_evidence_from_images_in_a_sampling_loop_goes_through_inversion(ddpm, unet):
    """A dataset's images reach the site of a sampling loop by inverting them (the noises that sampling
    turns into them) and regenerating: the example items and activations equal that path done by hand."""
    from latentexplainer_plugin.errors import SiteError

    sae = topk_sae(32, seed=5)
    adapter = SAEFeatureAdapter(ddpm, sae, features=[0, 1, 2], stats_bases=2)
    images = (ddpm.sample(ddpm.sample_bases(8, seed=6)).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    adapter.attach_examples(images, n_top=3, n_quantiles=2, n_contrast=2)
    noises = ddpm.invert(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    mean = mean_activations_by_hand(ddpm, unet.mid_block, noises, sae)  # (8 images, 48 features)
    for k in range(3):
        ex = adapter.example_set(k)
        top = [item for item, group in zip(ex.meta["items"], ex.meta["groups"]) if group == "top"]
        assert top == [j for j in torch.argsort(-mean[:, k], stable=True)[:3].tolist() if mean[j, k] > 0]
        for j, item in enumerate(ex.meta["items"]):
            assert abs(float(ex.activations[j]) - float(mean[item, k])) <= 1e-4 * max(1.0, float(mean[item, k]))
        if top:  # the examples shown are the dataset's images themselves
            assert ((ex.activating[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() == images[top[0]]).all()
    with pytest.raises(ValueError, match=r"images must have shape \(n, 3, 16, 16\)"):
        SAEFeatureAdapter(ddpm, sae, features=[0], stats_bases=2).attach_examples(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SiteError, match="UNet2DModel"):  # the user's model named, not the sampling driver
        SAEFeatureAdapter(ddpm, topk_sae(32), site="no_such_block.output")


def test_examples_from_the_models_own_samples(ddpm, unet, tmp_path, capsys):
    sae = topk_sae(32, seed=5)
    adapter = SAEFeatureAdapter(ddpm, sae, features=[0, 1, 2, 3], stats_bases=2)
    adapter.attach_sampled_examples(10, seed=4, n_top=3, n_quantiles=2, n_contrast=2)
    assert adapter.has_examples and adapter.describe()["stats_source"] == "data"
    bases = ddpm.sample_bases(10, seed=4)
    plain = ddpm.sample(bases)
    mean = mean_activations_by_hand(ddpm, unet.mid_block, bases, sae)  # (10 samples, 48 features)
    live = 0
    for k in range(4):
        ex = adapter.example_set(k)
        top = [item for item, group in zip(ex.meta["items"], ex.meta["groups"]) if group == "top"]
        want = [j for j in torch.argsort(-mean[:, k], stable=True)[:3].tolist() if mean[j, k] > 0]
        assert top == want, (k, top, want)
        for j, item in enumerate(ex.meta["items"]):
            assert abs(float(ex.activations[j]) - float(mean[item, k])) <= 1e-4 * max(1.0, float(mean[item, k]))
        if top:
            live += 1
            rendered = (plain[top[0]] * 255).round()
            assert ((ex.activating[0] * 255).round() - rendered).abs().max() <= 1  # the examples are the samples
        for item in ex.meta["inactive_items"]:
            assert mean[item, k] == 0
    assert live >= 2  # else this test would prove little
    out = tmp_path / "run"
    pipe_dir = tmp_path / "ddpm"
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(pipe_dir)
    sae_dir = write_saelens(tmp_path / "sae", sae, "mid_block.output")
    code = main(["explain", "--model", str(pipe_dir), "--sae", str(sae_dir), "--features", "0,1", "--steps", "3",
                 "--t-edit", "300", "-o", "sampled_examples=8", "--samples", "3", "--out", str(out), "--quiet"])
    assert code in (0, 1), capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["adapter"]["examples"]["n_items"] == 8
    assert all(e.get("examples") for e in data["latents"])


def test_sampled_examples_of_axis_features_name_the_factor_each_latent_captures():
    """A positive control for examples from the model's own samples: the ReLU identity SAE at the demo decoder's
    input has f_k = max(z_k, 0), so feature k fires on the decoded samples with z_k > 0; where its example
    explanation is clear it must name the factor latent k captures on the demo data."""
    from latentexplainer_plugin.adapters.vae import VAEAdapter
    from latentexplainer_plugin.evaluation.named import named_factors
    from latentexplainer_plugin.demo import demo_data, load_demo_model
    from latentexplainer_plugin.models.statistics import latent_stats

    demo = load_demo_model()
    data = demo_data(1000)
    captured = [m.factor for m in latent_stats(demo, data["images"], data["factors"], data["factor_names"]).factors]
    adapter = SAEFeatureAdapter(VAEAdapter(demo), SparseAutoencoder.identity(10), sampled_examples=600)
    results = LatentExplainer(adapter, backend="offline", samples=5, bias="combination").attribute()
    clear = 0
    for r in results:
        record = r.extras["examples"]
        assert record["status"] == "ok" and record["n_firing"] > 0 and record["n_not_firing"] > 0
        if record["clear"]:
            clear += 1
            assert captured[r.index] in named_factors(record), (r.id, record["explanation"], captured[r.index])
    assert clear >= 3, [r.extras["examples"].get("explanation") for r in results]
