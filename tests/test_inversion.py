"""Inversion of images to noises for the latent-diffusion families (DiT, PixArt, SD, SDXL, SD3, FLUX), and the
conditional direction finder on top of it.

The tiny pipelines are the ones of tests/test_transformer_diffusion.py (built offline from configs).
The round trips use the sampler's own latents (before the VAE decode): a random VAE's encoder is not
the inverse of its decoder, so images -> latents is checked separately, against a hand-written loop.
DiT, PixArt and SDXL round trips use a mild noise schedule (beta_end 0.002, no x_0 clipping): an untrained
denoiser makes the standard schedule's ODE too ill-conditioned (x_0 = x_T / sqrt(a_T), sqrt(a_T) =
0.006) to say anything about the inversion itself, as in tests/test_diffusion.py.
"""

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       PixArtAlphaPipeline, StableDiffusionXLPipeline)

from latentexplainer_plugin.adapters.mmdit import FluxAdapter, SD3Adapter
from latentexplainer_plugin.adapters.sdxl import SDXLAdapter
from latentexplainer_plugin.adapters.stable_diffusion import StableDiffusionAdapter
from latentexplainer_plugin.adapters.transformer_diffusion import DiTAdapter, PixArtAdapter
from latentexplainer_plugin.directions import conditional
from latentexplainer_plugin.directions.finders import BUILTIN_FINDERS
from latentexplainer_plugin.errors import OptionError
from test_transformer_diffusion import dit_dir, flux_dir, pixart_dir, sd3_dir, sdxl_dir  # noqa: F401 (fixtures)
from tiny_sd import tiny_sd_parts

STEPS = 10
MILD = {"beta_end": 0.002}


def final_latents(adapter, noise):
    """The sampler's latents before the VAE decode, from ``noise`` (the loop with an identity decode)."""
    adapter.driver.decode = lambda x: x
    try:
        with torch.no_grad():
            return adapter.driver(noise.to(adapter.device, adapter.dtype)).float().cpu()
    finally:
        del adapter.driver.decode


def mild_dit(dit_dir, **options):
    pipe = DiTPipeline.from_pretrained(dit_dir, scheduler=DDIMScheduler(clip_sample=False, **MILD))
    return DiTAdapter(pipe, steps=STEPS, t_edit=0, class_label=1, **options)


def mild_sdxl(sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, scheduler=EulerDiscreteScheduler(**MILD))
    return SDXLAdapter(pipe, steps=STEPS, t_edit=0, prompt="a photo of a cat")


# Measured (abs error of the round trip's latents, mean / max; 10 steps, 2 samples, mean |z_0| ~ 1-1.8;
# then the max error of the recovered noise):
#   dit (DDIM, guided)      refine 0: 0.11 / 0.64     refine 5: 5.4e-6 / 2.4e-4   noise 3.6e-5
#   pixart (DDIM, guided)   refine 0: 0.027 / 0.15    refine 5: 2.2e-7 / 1.4e-6
#   (PixArt with its own DPM-Solver++: refine 0: 0.017 / 0.076, refine 5: 0.02 / 0.11: first-order inversion)
#   sdxl (Euler, guided)    refine 0: 0.022 / 0.14    refine 5: 6.4e-7 / 3.4e-6   noise 2.5e-6
#   sd3 (flow matching)     refine 0: 0.014 / 0.085   refine 5: 2.3e-7 / 1.7e-6   noise 1.3e-6
#   flux (flow, packed)     refine 0: 0.027 / 0.12    refine 5: 8.4e-8 / 6.6e-7   noise 6.0e-7
@pytest.mark.parametrize("family", ["dit", "pixart", "sdxl", "sd3", "flux"])
def test_round_trip_reproduces_the_sampled_latents(request, family):
    if family == "dit":
        a = mild_dit(request.getfixturevalue("dit_dir"))
    elif family == "pixart":  # with DDIM: PixArt's own DPM-Solver++ is second order, its inversion approximate
        pipe = PixArtAlphaPipeline.from_pretrained(request.getfixturevalue("pixart_dir"),
                                                   scheduler=DDIMScheduler(clip_sample=False, **MILD))
        a = PixArtAdapter(pipe, steps=STEPS, t_edit=0, prompt="a cat", max_sequence_length=8)
    elif family == "sdxl":
        a = mild_sdxl(request.getfixturevalue("sdxl_dir"))
    elif family == "sd3":
        a = SD3Adapter.from_pretrained(request.getfixturevalue("sd3_dir"), steps=STEPS, t_edit=0, max_sequence_length=8)
    else:
        a = FluxAdapter.from_pretrained(request.getfixturevalue("flux_dir"), steps=STEPS, t_edit=0, max_sequence_length=8,
                                        resolution=16)
    noise = a.sample_bases(2, seed=3)
    z0 = final_latents(a, noise)
    classic = a.invert_samples(z0)
    refined = a.invert_samples(z0, refine=5)
    assert torch.equal(classic, a.invert_samples(z0))  # deterministic: same input, same noises
    classic_err = (final_latents(a, classic) - z0).abs()
    refined_err = (final_latents(a, refined) - z0).abs()
    assert classic_err.mean() < 0.2 and classic_err.mean() > 100 * refined_err.mean()
    assert refined_err.max() < 1e-3
    assert (refined - noise).abs().max() < 1e-4  # the noise itself comes back


def hand_dit_inversion(pipe, images, guidance=4.0):
    """DDIM inversion written out: VAE posterior mean x scaling_factor, then for t ascending
    eps = eps_u + g (eps_c - eps_u), x0 = (z - sqrt(1 - ab_prev) eps) / sqrt(ab_prev) clipped to [-1, 1],
    z = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Song et al. 2021, eq. 12 backwards)."""
    sch = DDIMScheduler.from_config(pipe.scheduler.config)
    sch.set_timesteps(STEPS)
    ab = sch.alphas_cumprod.double()
    jump = 1000 // STEPS
    z = pipe.vae.encode(images * 2 - 1).latent_dist.mean.double() * pipe.vae.config.scaling_factor
    labels = torch.tensor([1] * len(z) + [1000] * len(z))  # conditional first, as DiTPipeline orders them
    for t in reversed(sch.timesteps.tolist()):
        ab_prev = ab[t - jump] if t - jump >= 0 else torch.tensor(1.0, dtype=torch.float64)
        out = pipe.transformer(torch.cat([z, z]).float(), timestep=torch.full((2 * len(z),), t), class_labels=labels).sample
        cond, uncond = out[:, :4].double().chunk(2)
        eps = uncond + guidance * (cond - uncond)
        x0 = ((z - (1 - ab_prev).sqrt() * eps) / ab_prev.sqrt()).clamp(-1, 1)
        z = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
    return z.float()


def test_dit_invert_equals_the_hand_written_ddim_loop(dit_dir):
    a = DiTAdapter.from_pretrained(dit_dir, steps=STEPS, t_edit=0, class_label=1)  # DDIM with x_0 clipping, guidance 4
    assert a.pixel_shape == (3, 16, 16)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = a.invert(images)
    with torch.no_grad():
        want = hand_dit_inversion(DiTPipeline.from_pretrained(dit_dir), images)
    assert got.shape == (3, 4, 8, 8)
    assert (got - want).abs().max() <= 1e-5  # measured: ~1e-7 (float32 model calls in another batch order)
    assert torch.equal(got, a.invert(images))


def test_sd3_invert_equals_the_hand_written_euler_flow_loop(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    a = SD3Adapter.from_pretrained(sd3_dir, steps=STEPS, t_edit=0, max_sequence_length=8, prompt="a cat", guidance_scale=1.0)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False, max_sequence_length=8)
        config = pipe.vae.config
        z = ((pipe.vae.encode(images * 2 - 1).latent_dist.mean - config.shift_factor) * config.scaling_factor).double()
        sch = pipe.scheduler
        sch.set_timesteps(STEPS)
        sigmas = sch.sigmas.double()
        for i in reversed(range(STEPS)):  # sampling: z_{i+1} = z_i + (sigma_{i+1} - sigma_i) v(z_i, t_i); backwards with v at z_{i+1}
            t = sch.timesteps[i].expand(len(z))
            v = pipe.transformer(z.float(), timestep=t, encoder_hidden_states=embeds.expand(len(z), -1, -1),
                                 pooled_projections=pooled.expand(len(z), -1)).sample.double()
            z = z - (sigmas[i + 1] - sigmas[i]) * v
    assert (a.invert(images) - z.float()).abs().max() <= 1e-5


def test_sd_and_sdxl_invert_through_their_vae(sdxl_dir):
    parts = tiny_sd_parts()
    sd = StableDiffusionAdapter(parts.pop("unet"), DDIMScheduler(clip_sample=False, **MILD), steps=STEPS, t_edit=0, **parts)
    sdxl = mild_sdxl(sdxl_dir)
    for a in (sd, sdxl):
        assert "inversion" in a.capabilities and a.pixel_shape == (3, 16, 16)
        images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():  # images -> latents is the inverse of the decode's scaling
            z = a.vae.encode(images * 2 - 1).latent_dist.mean * a.vae.config.scaling_factor
        assert (a.invert(images, refine=1) - a.invert_samples(z, refine=1)).abs().max() <= 1e-6
        with pytest.raises(ValueError, match=r"images must have shape \(n, 3, 16, 16\)"):
            a.invert(torch.rand(2, 3, 8, 8))
        with pytest.raises(ValueError, match="refine must be an integer >= 0"):
            a.invert(images, refine=-1)


def test_sdxl_encode_normalizes_with_latents_mean_and_std_and_undoes_the_decode(sdxl_dir):
    from test_transformer_diffusion import tiny_vae

    torch.manual_seed(4)
    vae = tiny_vae(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(2.0, 0.5, 1.0, 4.0), scaling_factor=0.6)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, vae=vae, scheduler=EulerDiscreteScheduler(**MILD))
    a = SDXLAdapter(pipe, steps=3, t_edit=0, prompt="a cat")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1), torch.tensor([2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1)
        want = (z - mean) * 0.6 / std  # StableDiffusionXLPipeline's image latents (img2img), written out
        assert (a.driver.encode(x) - want).abs().max() <= 1e-6
        assert (a.driver.decode(a.driver.encode(x)) - vae.decode(z).sample).abs().max() <= 1e-5  # the decode undoes it


def test_conditional_direction_through_the_cli_is_the_mean_difference(dit_dir, tmp_path):
    from latentexplainer_plugin.cli import main
    from latentexplainer_plugin.directions import Directions

    rng = np.random.default_rng(0)
    smiling = np.array([0, 1, 0, 1, 1, 0])
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    images[smiling == 1, :8] = 255  # the labelled factor shows: a bright top half
    np.savez(tmp_path / "faces.npz", images=images, factors=np.stack([smiling, np.arange(6)], axis=1),
             factor_names=np.array(["smiling", "index"]))
    out = tmp_path / "run"
    code = main(["explain", "--model", str(dit_dir), "-o", "class_label=golden retriever", "--direction", "conditional",
                 "--data", str(tmp_path / "faces.npz"), "--steps", "3", "--t-edit", "300", "--edit-scale", "2",
                 "--samples", "2", "--similarity", "bow", "--out", str(out), "--quiet"])
    assert code == 0
    found = Directions.load(out / "directions.safetensors")
    assert found.provenance["finder"] == "conditional" and len(found) == 1  # one binary factor: smiling
    a = DiTAdapter.from_pretrained(dit_dir, steps=3, t_edit=300, class_label=1)
    h = a.capture_h(a.invert(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)).mean(dim=1).double()
    diff = h[smiling == 1].mean(0) - h[smiling == 0].mean(0)
    assert (found.vectors[0].double() - diff / diff.norm()).abs().max() <= 1e-5


def test_a_family_without_inversion_is_refused_clearly():
    from latentexplainer_plugin.adapters.stylegan import StyleGANAdapter

    finder = next(f for f in BUILTIN_FINDERS if f.name == "conditional")
    for family in (DiTAdapter, PixArtAdapter, SDXLAdapter, SD3Adapter, FluxAdapter, StableDiffusionAdapter):
        finder.check_adapter(family)  # every diffusion family inverts now
    with pytest.raises(OptionError, match="needs an adapter with inversion"):
        finder.check_adapter(StyleGANAdapter)

    class NoInversion:  # the Python API refuses too, naming the families that invert, before any work
        name, capabilities = "stylegan", frozenset({"directions"})

        def invert(self, images):
            raise AssertionError("must not be called")

    with pytest.raises(ValueError, match=r"the stylegan adapter cannot invert images .*dit, pixart, sd3 and flux can"):
        conditional(adapter=NoInversion(), images=torch.rand(2, 3, 4, 4), labels=[0, 1])


def test_unsupported_schedulers_are_refused_before_any_work(dit_dir):
    from diffusers import HeunDiscreteScheduler

    a = DiTAdapter(DiTPipeline.from_pretrained(dit_dir, scheduler=DDIMScheduler(prediction_type="v_prediction")), steps=2)
    with pytest.raises(ValueError, match="supports epsilon-prediction models"):
        a.invert(torch.rand(1, 3, 16, 16))
    b = DiTAdapter(DiTPipeline.from_pretrained(dit_dir, scheduler=HeunDiscreteScheduler()), steps=2)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler is none of these: give the pipeline a DDIMScheduler"):
        b.invert(torch.rand(1, 3, 16, 16))
    c = DiTAdapter(DiTPipeline.from_pretrained(dit_dir, scheduler=DPMSolverMultistepScheduler()), steps=2)
    assert c.inversion_kind() == "vp"  # variance preserving: first-order DDIM along its timesteps
