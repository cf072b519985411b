"""DDPM/DDIM adapter: h-space edits through nnsight match a plain forward-hook loop, in one trace.

Every test uses a tiny random UNet2DModel (16x16 images, h-space (B, 32, 8, 8)) built from a
config, so the whole file runs in seconds on CPU.
"""

import json

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from latentexplainer_plugin.adapters.diffusion import DDPMAdapter, load_ddpm
from latentexplainer_plugin.cli import main
from latentexplainer_plugin.directions import Directions, pullback
from latentexplainer_plugin.safe_load import LoadError
from latentexplainer_plugin.store import read_results

STEPS = 5  # timesteps 800, 600, 400, 200, 0

# Float32 budget for two sampling loops that compute the same images with different batches (or
# thread counts): oneDNN picks its blocking and thread split by batch size, so sums are reordered
# and each DDIM update may round differently by some ulps of the iterate (|x| <= 4 here). Allow
# 32 ulps of that scale per step: 5 * 32 * 1.19e-7 * 4 = 7.6e-5 on images in [0, 1]. Measured: 0
# with 1 thread, at most 1.5e-5 with 2 threads (8 seeds); a real edit changes pixels by >= 0.7
# here, and editing one step more than asked by > 1e-3 (test_edit_window_touches_only_its_steps).
X_SCALE = 4.0
FP32_TOL = STEPS * 32 * torch.finfo(torch.float32).eps * X_SCALE


def tiny_unet(size=16, channels=(16, 32), seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def adapter(unet):
    a = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=STEPS, t_edit=500, scale=4.0)
    a.set_directions(torch.randn(2, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    return a


def reference_sample(unet, x, edit_step):
    """The sampling loop written out, editing h with a plain forward hook: ``edit_step(i, h) -> h``."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    calls = []

    def hook(module, args, out):
        calls.append(len(calls))
        return edit_step(len(calls) - 1, out)

    handle = unet.mid_block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    finally:
        handle.remove()
    assert len(calls) == STEPS
    return ((x + 1) / 2).clamp(0, 1)


def flat_batch(bases, strengths, k=1):
    n, s = len(bases), len(strengths)
    x = bases[None, :, None].expand(k, n, s, *bases.shape[1:]).reshape(-1, *bases.shape[1:])
    return x, torch.as_tensor(strengths, dtype=torch.float32).repeat(k * n)


def add_in_window(alpha, vectors, window):
    view = (-1, 1, 1, 1)
    return lambda i, h: h + alpha.view(view) * vectors if i in window else h


def test_site_is_h_space_and_window_follows_t_edit(adapter):
    assert str(adapter.site) == "mid_block.output"
    assert adapter.h_shape() == (32, 8, 8)
    assert adapter.timesteps == [800, 600, 400, 200, 0]
    assert adapter.edit_calls == slice(0, 2)  # t >= 500: 800 and 600, not 400
    assert adapter.n_latents == 2 and adapter.latent_id(1) == "dir1"


def test_nnsight_edit_matches_reference_hook_loop(adapter, unet):
    bases = adapter.sample_bases(2, seed=3)
    strengths = [-2.0, 0.0, 2.0]
    traversals = adapter.traverse([0, 1], bases, strengths)
    assert len(traversals) == 2 and traversals[0].images.shape == (2, 1, 3, 3, 16, 16)
    window = range(2)
    for k, tr in enumerate(traversals):  # one direction for the whole reference batch
        x, alpha = flat_batch(bases, strengths)
        ref = reference_sample(unet, x, add_in_window(alpha, adapter.directions[k] * 4.0, window))
        got = tr.images[:, 0].reshape(-1, 3, 16, 16)
        assert (got - ref).abs().max() <= FP32_TOL
        assert (tr.images[:, 0, 2] - tr.images[:, 0, 1]).abs().max() > 1e-2  # the edit shows
        assert tr.meta["edited_timesteps"] == [800, 600]
    # directions passed in (any norm) are traversed as given, and the adapter keeps its own
    again = adapter.traverse([], bases, strengths, directions=adapter.directions[1:] * 7.0)[0]
    assert (again.images - traversals[1].images).abs().max() <= FP32_TOL and adapter.n_latents == 2


def test_strength_zero_reproduces_unedited_sampling(adapter):
    bases = adapter.sample_bases(2, seed=4)
    strengths = [-1.0, 0.0, 1.0]
    tr = adapter.traverse([0], bases, strengths)[0]
    x, _ = flat_batch(bases, strengths)
    plain = adapter.sample(x).view(2, 3, 3, 16, 16)  # same batch, no nnsight, no edit
    assert torch.equal(tr.images[:, 0, 1], plain[:, 1])
    assert (tr.images[:, 0, 1] - adapter.sample(bases)).abs().max() <= FP32_TOL  # another batch size


def test_edit_window_touches_only_its_steps(unet):
    a = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=STEPS, t_edit=700, scale=4.0)
    assert a.edit_calls == slice(0, 1)
    v = torch.randn(*a.h_shape(), generator=torch.Generator().manual_seed(2))
    a.set_directions(v[None])
    bases = a.sample_bases(1, seed=5)
    tr = a.traverse([0], bases, [0.0, 3.0])[0]
    assert tr.meta["edited_timesteps"] == [800]
    x, alpha = flat_batch(bases, [0.0, 3.0])
    unit = a.directions[0] * 4.0
    in_window = reference_sample(unet, x, add_in_window(alpha, unit, {0}))
    everywhere = reference_sample(unet, x, add_in_window(alpha, unit, set(range(STEPS))))
    got = tr.images[0, 0]
    assert (got - in_window).abs().max() <= FP32_TOL
    assert (got[1] - everywhere[1]).abs().max() > 1e-3  # editing later steps would differ


def test_strengths_are_the_batch_one_unet_call_per_step(adapter):
    bases = adapter.sample_bases(2, seed=6)
    adapter.traverse([0], bases, [-1.0, 1.0])  # warm: probes h's shape
    calls = []
    handle = adapter.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        adapter.traverse([0, 1], bases, [-3.0, -1.5, 0.0, 1.5, 3.0])
    finally:
        handle.remove()
    assert calls == [2 * 2 * 5] * STEPS  # (directions x bases x strengths) items, `steps` calls


def test_auto_scale_is_std_along_direction(unet):
    a = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=STEPS, calibration_samples=4)
    a.set_directions(torch.randn(1, *a.h_shape(), generator=torch.Generator().manual_seed(7)))
    h = a.capture_h(a.sample_bases(4, seed=1_000_003))  # (4, window, *h)
    proj = (h.flatten(2) @ a.directions[0].flatten()).std(dim=0).mean()
    assert a.scales()[0] == pytest.approx(float(proj), rel=1e-4)


def test_ddim_inversion_reconstructs(unet):
    # An untrained UNet makes the standard schedule's ODE ill-conditioned (x0 = x_T / sqrt(a_T) with
    # sqrt(a_T) = 0.006): a mild schedule (sqrt(a_T) = 0.59) keeps the check about the inversion itself.
    a = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000, beta_end=0.002, clip_sample=False), steps=5)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    classic = (a.sample(a.invert(images)) - images).abs()
    refined = (a.sample(a.invert(images, refine=5)) - images).abs()
    assert classic.mean() < 0.04  # measured: mean 0.026, max 0.19 (eps taken at the less noisy sample)
    assert refined.max() < 1e-3  # measured: mean 2e-5, max 1.2e-4 (fixed-point iterations solve each step)
    with pytest.raises(ValueError, match=r"images must have shape \(n, 3, 16, 16\)"):
        a.invert(torch.rand(2, 3, 8, 8))


def test_bad_inputs_are_refused_clearly(adapter, unet):
    bases = adapter.sample_bases(1)
    with pytest.raises(ValueError, match="use the combination bias"):
        adapter.traverse([0], bases, [-1.0, 1.0], rows=2)
    with pytest.raises(ValueError, match=r"directions have shape \(3, 16, 8, 8\).*has shape \(32, 8, 8\)"):
        adapter.set_directions(torch.randn(3, 16, 8, 8))
    with pytest.raises(ValueError, match="above every sampling timestep"):
        DDPMAdapter(unet, DDIMScheduler(), steps=STEPS, t_edit=900)
    with pytest.raises(IndexError, match="2 latents"):
        adapter.traverse([5], bases, [-1.0, 1.0])
    with pytest.raises(IndexError, match="no directions yet"):
        DDPMAdapter(unet, steps=2).check_index(0)


def save_pipeline(root, unet):
    unet.save_pretrained(root / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    return root


def test_load_pipeline_layout_and_bare_unet(tmp_path, unet):
    pipe = save_pipeline(tmp_path / "pipe", unet)
    loaded, scheduler = load_ddpm(pipe)
    assert isinstance(scheduler, DDIMScheduler)
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)
    unet.save_pretrained(tmp_path / "bare")
    loaded, scheduler = load_ddpm(tmp_path / "bare")
    assert isinstance(scheduler, DDIMScheduler) and scheduler.config.num_train_timesteps == 1000
    a = DDPMAdapter.from_pretrained(tmp_path / "bare", steps=3, t_edit=0)
    assert a.model_id.endswith("bare") and a.edit_calls == slice(0, 3)
    with pytest.raises(LoadError, match="does not exist"):
        load_ddpm(tmp_path / "missing")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, unet):
    return save_pipeline(tmp_path_factory.mktemp("ddpm") / "pipe", unet)


def test_cli_explain_ddpm_end_to_end(pipeline_dir, tmp_path):
    out = tmp_path / "run"
    code = main(["explain", "--model", str(pipeline_dir), "--adapter", "ddpm", "--direction", "pca", "--n-directions", "4",
                 "--steps", "5", "--samples", "2", "--similarity", "bow", "--out", str(out), "--quiet"])
    assert code == 0
    data = read_results(out / "results.json")
    assert data["bias"] == "combination"  # the ddpm default: one row per base
    assert [e["id"] for e in data["latents"]] == ["dir0", "dir1", "dir2", "dir3"]
    for e in data["latents"]:
        assert e["status"] == "ok" and (out / e["strip"]).is_file()
    assert (out / "report.html").is_file()
    saved = Directions.load(out / "directions.safetensors")
    assert saved.vectors.shape == (4, 32, 8, 8)
    assert saved.provenance["finder"] == "pca" and saved.provenance["site"] == "mid_block.output"
    assert saved.provenance["timestep"] == [800, 600]


@pytest.mark.parametrize("extra, message", [
    (["--direction", "wiggle"], "unknown direction finder 'wiggle'; registered: axes, conditional, ganspace, given, pca, pullback, sefa"),
    (["--n-directions", "0"], "--n-directions must be >= 1, got 0"),
    (["--bias", "disentanglement"], "use --bias combination"),
    (["--t-edit", "5000"], "t_edit must be a timestep in 0..999"),
    (["--edit-scale", "big"], "--edit-scale must be auto or a positive number"),
])
def test_cli_bad_inputs(pipeline_dir, tmp_path, capsys, extra, message):
    code = main(["explain", "--model", str(pipeline_dir), "--adapter", "ddpm", "--steps", "2", "--samples", "2",
                 "--similarity", "bow", "--out", str(tmp_path / "run"), "--quiet", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_wrong_shape_direction_file(pipeline_dir, tmp_path, capsys):
    path = Directions(torch.randn(2, 16, 4, 4), {"finder": "given"}).save(tmp_path / "dirs.safetensors")
    code = main(["explain", "--model", str(pipeline_dir), "--adapter", "ddpm", "--direction", str(path), "--steps", "2",
                 "--samples", "2", "--similarity", "bow", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "(2, 16, 4, 4)" in err and "(32, 8, 8)" in err


def test_docs_python_example_runs_and_prints_what_it_says(capsys):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "diffusion.md").read_text()
    code, printed = re.search(r"```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", doc, flags=re.S).groups()
    exec(compile(code, "docs/diffusion.md", "exec"), {})
    assert capsys.readouterr().out == printed


# -- Stable Diffusion: a tiny text-conditioned pipeline built offline from configs -------------------

@pytest.fixture(scope="module")
def sd_parts():
    try:
        from tests.tiny_sd import tiny_sd_parts
    except ImportError:  # tests/ on sys.path instead of the repository root
        from tiny_sd import tiny_sd_parts  # type: ignore

    return tiny_sd_parts()


def test_stable_diffusion_edits_both_guidance_halves(sd_parts):
    from latentexplainer_plugin.adapters.stable_diffusion import StableDiffusionAdapter, encode_prompt

    p = sd_parts
    a = StableDiffusionAdapter(p["unet"], DDIMScheduler(), vae=p["vae"], text_encoder=p["text_encoder"], tokenizer=p["tokenizer"],
                               prompt="a photo of a face", guidance_scale=5.0, steps=3, t_edit=0, scale=3.0)
    assert a.h_shape() == (32, 4, 4) and a.image_shape == (4, 8, 8) and a.copies == 2
    a.set_directions(torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(1)))
    bases = a.sample_bases(1, seed=2)
    tr = a.traverse([0], bases, [-2.0, 0.0, 2.0])[0]
    assert tr.images.shape == (1, 1, 3, 3, 16, 16)  # latents 8x8 decoded by the VAE to 16x16

    # the guided loop written out; the hook edits both halves [negative; prompt] of the UNet batch
    x, alpha = flat_batch(bases, [-2.0, 0.0, 2.0])
    v = a.directions[0] * 3.0
    prompt = encode_prompt(p["text_encoder"], p["tokenizer"], "a photo of a face", torch.device("cpu")).expand(3, -1, -1)
    negative = encode_prompt(p["text_encoder"], p["tokenizer"], "", torch.device("cpu")).expand(3, -1, -1)
    handle = p["unet"].mid_block.register_forward_hook(lambda m, args, out: out + alpha.repeat(2).view(-1, 1, 1, 1) * v)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(3)
    try:
        with torch.no_grad():
            for t in scheduler.timesteps:
                neg, pos = p["unet"](torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, prompt])).sample.chunk(2)
                x = scheduler.step(neg + 5.0 * (pos - neg), t, x).prev_sample
            ref = ((p["vae"].decode(x / p["vae"].config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    finally:
        handle.remove()
    assert (tr.images[0, 0] - ref).abs().max() <= FP32_TOL
    assert (tr.images[0, 0, 1] - a.sample(bases)[0]).abs().max() <= FP32_TOL  # strength 0: the unedited image
    pulled = pullback(a, n_directions=2, n_iter=2)  # the Jacobian of the prompt's pass
    assert pulled.vectors.shape == (2, 32, 4, 4) and pulled.x_vectors.shape == (2, 4, 8, 8)


def test_cli_explain_stable_diffusion(sd_parts, tmp_path):
    root = tmp_path / "sd"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        sd_parts[name].save_pretrained(root / name)
    DDIMScheduler().save_pretrained(root / "scheduler")
    out = tmp_path / "run"
    code = main(["explain", "--model", str(root), "--adapter", "sd", "--prompt", "a smiling face", "--direction", "pca",
                 "--n-directions", "2", "--steps", "2", "--t-edit", "0", "--edit-scale", "2", "--samples", "2", "--similarity", "bow",
                 "--out", str(out), "--quiet"])
    assert code == 0
    data = read_results(out / "results.json")
    assert data["adapter"]["prompt"] == "a smiling face" and data["bias"] == "combination"
    assert [e["status"] for e in data["latents"]] == ["ok", "ok"]
    assert Directions.load(out / "directions.safetensors").provenance["finder"] == "pca"
