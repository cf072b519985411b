"""Update sites (a block's residual update u = output - input): capture and edits against plain torch hooks.

A tiny random UNet2DModel sampling loop (16x16 images, mid block (B, 32, 8, 8)) driven by the
``ddpm`` adapter; every reference is the same loop written out with forward (pre-)hooks on the
block. The transformer families (DiT, SD3, FLUX, SDXL) are tested in test_transformer_diffusion.py.
"""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from latentexplainer_plugin.adapters.diffusion import DDPMAdapter
from latentexplainer_plugin.directions import pullback
from latentexplainer_plugin.directions.pullback import site_function
from latentexplainer_plugin.errors import SiteError
from latentexplainer_plugin.hooks import capture, probe_shape, resolve_module, run_with_edit
from latentexplainer_plugin.types import Edit, Site

STEPS = 3  # timesteps 666, 333, 0; t_edit=300 edits the first two
# The update site computes out + (edit(u) - u) with u = out - in, the output site out + d and the
# reference hooks in + edit(u): equal in exact arithmetic, different roundings in float32 (|h| ~ 3),
# which the next UNet calls and DDIM steps amplify. Measured on images in [0, 1], 1 and 2 threads:
# <= 2.9e-6 (add) and <= 4.6e-6 (set) in float32; 0 in float64. A real edit moves pixels by > 0.05.
TOLS = {torch.float32: 1e-5, torch.float64: 1e-9}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()


def make(unet, site, scale=4.0, dtype=None):
    return DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=STEPS, t_edit=300, scale=scale, site=site,
                       dtype=dtype)


@pytest.fixture(scope="module")
def unet64(unet):
    import copy

    return copy.deepcopy(unet).double()


@pytest.fixture(scope="module")
def bases():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def run_with_hooks(adapter, x, edit_update=None):
    """Plain sampling with torch hooks on the mid block: records u = out - in on every call and, with
    ``edit_update(i, inputs, u) -> u'``, replaces the output by inputs + u'."""
    block, seen, updates = adapter.unet.mid_block, [], []

    def post(module, args, out):
        i, inputs = len(updates), seen.pop()
        updates.append(out - inputs)
        return out if edit_update is None else inputs + edit_update(i, inputs, out - inputs)

    handles = [block.register_forward_pre_hook(lambda m, args: seen.append(args[0])), block.register_forward_hook(post)]
    try:
        images = adapter.sample(x)
    finally:
        for h in handles:
            h.remove()
    return images, torch.stack(updates, dim=1)  # (n, steps, *u_shape)


def test_capture_at_an_update_site_equals_output_minus_input(unet, bases):
    a = make(unet, "mid_block.update")
    assert a.site == Site("mid_block", "update") and str(a.site) == "mid_block.update"
    assert a.h_shape() == (32, 8, 8)
    got = a.capture_h(bases, window_only=False)
    _, ref = run_with_hooks(a, bases)
    assert got.shape == ref.shape == (2, STEPS, 32, 8, 8)
    assert (got - ref).abs().max() <= 1e-5 and ref.abs().max() > 0.1  # a real update, not zeros
    # the one-call path and the probe agree too
    x, t = bases * 1.0, 500
    (u,) = capture(a.unet, Site("mid_block", "update"), x, t)
    _, one = run_with_hooks_once(a.unet, x, t)
    assert (u - one).abs().max() <= 1e-5
    assert probe_shape(a.unet, Site("mid_block", "update"), x, t) == u.shape


def run_with_hooks_once(unet, x, t):
    seen, found = [], []
    h1 = unet.mid_block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    h2 = unet.mid_block.register_forward_hook(lambda m, args, out: found.append(out - seen.pop()))
    try:
        with torch.no_grad():
            out = unet(x, t).sample
    finally:
        h1.remove()
        h2.remove()
    return out, found[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_additive_edit_at_the_update_site_equals_the_same_edit_at_the_output(unet, unet64, bases, dtype):
    model = unet if dtype == torch.float32 else unet64
    at_update, at_output = make(model, "mid_block.update"), make(model, "mid_block.output")
    assert at_update.dtype == dtype
    v = torch.randn(32, 8, 8, generator=torch.Generator().manual_seed(5))
    x = bases.repeat_interleave(3, dim=0)
    alpha = torch.tensor([-2.0, 0.0, 2.0]).repeat(2)
    got, ref = at_update.sample_edited(x, alpha, v), at_output.sample_edited(x, alpha, v)
    assert (got - ref).abs().max() <= TOLS[dtype]
    assert (got[1] - at_update.sample(x)[1]).abs().max() <= TOLS[dtype]  # strength 0: unedited
    assert (got - at_update.sample(x)).abs().amax(dim=(1, 2, 3))[[0, 2, 3, 5]].min() > 0.05  # the edit shows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_set_edit_at_the_update_site_equals_inputs_plus_set_of_the_update(unet, unet64, bases, dtype):
    a = make(unet if dtype == torch.float32 else unet64, "mid_block.update")
    index, strengths = 77, torch.tensor([-3.0, 5.0])
    window = set(range(STEPS)[a.edit_calls])
    assert window == {0, 1}

    def set_update(i, inputs, u):
        if i not in window:
            return u
        flat = u.reshape(len(u), -1).clone()
        flat[:, index] = strengths.to(flat.dtype)
        return flat.view_as(u)

    ref, _ = run_with_hooks(a, bases, set_update)
    edit = Edit("set", strengths, index=index, calls=a.edit_calls)
    x = bases.to(dtype)
    got = a.output_to_images(run_with_edit(a.driver, a.site, edit, x, calls=a.n_calls))
    assert (got - ref).abs().max() <= TOLS[dtype]
    # not the same as setting the output coordinate: the update site steers the update
    at_output = a.output_to_images(run_with_edit(a.driver, Site("mid_block", "output"), edit, x, calls=a.n_calls))
    assert (got - at_output).abs().max() > 1e-3


def test_pca_and_pullback_run_at_an_update_site(unet):
    from latentexplainer_plugin.adapters.diffusion import find_directions

    a = make(unet, "mid_block.update", scale="auto")
    found = find_directions(a, "pca", 2)
    assert found.vectors.shape == (2, 32, 8, 8) and found.provenance["site"] == "mid_block.update"
    # the pull-back's site function is the update too
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    f = site_function(a.unet, a.unet.mid_block, "update", 333)
    _, ref = run_with_hooks_once(a.unet, x, 333)
    with torch.no_grad():
        assert (f(x) - ref).abs().max() <= 1e-5
    pulled = pullback(a, n_directions=2, n_iter=2)
    assert pulled.vectors.shape == (2, 32, 8, 8) and pulled.provenance["site"] == "mid_block.update"


def test_bad_update_sites_are_refused_with_the_allowed_kinds(unet, bases):
    a = make(unet, "mid_block.output")
    with pytest.raises(SiteError, match=r"'mid_block.updat' is not in .*site kind.*input, output, update \(e.g. mid_block.update\)"):
        resolve_module(a.driver, "mid_block.updat")
    with pytest.raises(ValueError, match="site kind must be one of input, output, update, got 'delta'"):
        Site("mid_block", "delta")
    # a block that downsamples has no update: refused with the shapes, by the probe and in a trace
    with pytest.raises(SiteError, match=r"down_blocks.0.update: the block's input has shape \(2, 16, 16, 16\) and its output "
                                        r"\(2, 16, 8, 8\)"):
        probe_shape(a.driver, Site("down_blocks.0", "update"), bases)
    with pytest.raises(SiteError, match="needs the same shape"):
        capture(a.driver, Site("down_blocks.0", "update"), bases, calls=STEPS)
    with pytest.raises(SiteError, match="needs the same shape") as info:  # refused when the adapter is built, before sampling
        make(unet, "down_blocks.0.update")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    assert f"error: --model MODEL: {info.value}\n" in doc  # quoted exactly in troubleshooting.md


def test_site_strings_parse_the_update_kind():
    assert Site.parse("transformer_blocks.3.update") == Site("transformer_blocks.3", "update")
    assert Site.parse("mid_block") == Site("mid_block", "output") and Site.parse("decoder.input").kind == "input"
    assert str(Site("down_blocks.0.attentions.0.transformer_blocks.0", "update")).endswith("transformer_blocks.0.update")


@pytest.fixture(scope="module")
def sd_adapter_factory():
    """A tiny text-conditioned Stable Diffusion (``sd`` adapter): UNet2DConditionModel with a cross-attention
    down block, whose BasicTransformerBlock is the kind of site SAEs on SDXL-Turbo read."""
    from latentexplainer_plugin.adapters.stable_diffusion import StableDiffusionAdapter
    try:
        from tests.tiny_sd import tiny_sd_parts
    except ImportError:  # tests/ on sys.path instead of the repository root
        from tiny_sd import tiny_sd_parts  # type: ignore

    parts = tiny_sd_parts()
    unet, vae, encoder, tokenizer = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]

    def make_sd(site):
        return StableDiffusionAdapter(unet, DDIMScheduler(), vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                                      prompt="a photo of a face", guidance_scale=5.0, steps=STEPS, t_edit=300, scale=3.0,
                                      site=site)

    return make_sd


def test_stable_diffusion_update_sites_in_the_unet(sd_adapter_factory):
    block = "down_blocks.0.attentions.0.transformer_blocks.0"  # (B, 64 tokens, 16) inside the UNet
    a = sd_adapter_factory(f"{block}.update")
    assert a.h_shape() == (64, 16) and a.copies == 2
    bases = a.sample_bases(2, seed=4)
    got = a.capture_h(bases, window_only=False)
    module, seen, updates = a.unet.get_submodule(block), [], []
    handles = [module.register_forward_pre_hook(lambda m, args: seen.append(args[0])),
               module.register_forward_hook(lambda m, args, out: updates.append(out - seen.pop()))]
    try:
        a.sample(bases)
    finally:
        for h in handles:
            h.remove()
    ref = torch.stack([u[-2:] for u in updates], dim=1)  # the prompt's (conditional) half
    assert got.shape == ref.shape == (2, STEPS, 64, 16) and (got - ref).abs().max() <= 1e-5
    # an additive edit there (both guidance halves, the edit window) equals the edit at the block's output
    v = torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    x, alpha = bases.repeat_interleave(3, dim=0), torch.tensor([-2.0, 0.0, 2.0]).repeat(2)
    edited = a.sample_edited(x, alpha, v)
    assert (edited - sd_adapter_factory(f"{block}.output").sample_edited(x, alpha, v)).abs().max() <= TOLS[torch.float32]
    assert (edited[2] - edited[1]).abs().max() > 0.05
    assert sd_adapter_factory("mid_block.update").h_shape() == (32, 4, 4)
