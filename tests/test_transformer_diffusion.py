"""Transformer diffusion adapters (DiT, PixArt): the nnsight edit against the real diffusers pipelines.

Every test uses tiny random pipelines built offline from configs (8x8 latents, 4 transformer
blocks of width 16, a 2-level AutoencoderKL; PixArt: a one-layer T5 encoder and a WordLevel
tokenizer), saved with ``save_pretrained`` and loaded back through the adapters' ``from_pretrained``.
The references are the diffusers pipelines themselves (``DiTPipeline``, ``PixArtAlphaPipeline``),
edited with a plain torch forward hook on the same block.
"""

import json

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler,
                       PixArtAlphaPipeline, PixArtTransformer2DModel)

from latentexplainer_plugin.adapters.diffusion import find_directions
from latentexplainer_plugin.adapters.mmdit import FluxAdapter, SD3Adapter
from latentexplainer_plugin.adapters.sdxl import SDXLAdapter
from latentexplainer_plugin.adapters.transformer_diffusion import DiTAdapter, PixArtAdapter
from latentexplainer_plugin.directions import pullback
from latentexplainer_plugin.errors import OptionError
from latentexplainer_plugin.options import KNOWN_CAPABILITIES, validate_options
from latentexplainer_plugin.safe_load import LoadError

STEPS = 3
# Two float32 computations of the same images that batch differently (the pipelines put the
# conditional half first for DiT, a different batch layout than the adapter's): sums may round
# differently by some ulps per step. Measured: <= 5e-7 on images in [0, 1]; a real edit moves
# pixels by > 0.05 here.
TOL = 1e-5
SEED = 11


def tiny_vae(**config):
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=16, **config).eval()


def word_tokenizer(eos: str | None = None):
    """A word-level tokenizer over a few prompt words, built offline (no tokenizer files on the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", *([eos] if eos else []), "<unk>", "a", "photo", "of", "face", "smiling", "cat"]
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"eos_token": eos} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>", model_max_length=8, **extra)


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    torch.manual_seed(0)
    # DiTPipeline hard-codes the null class 1000 for guidance, so the label table needs 1000 classes
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=4, sample_size=8, patch_size=2, norm_num_groups=8,
                                        num_embeds_ada_norm=1000).eval()
    root = tmp_path_factory.mktemp("dit") / "pipe"
    DiTPipeline(transformer, tiny_vae(), DDIMScheduler()).save_pretrained(root)
    index = json.loads((root / "model_index.json").read_text())  # as in facebook/DiT-XL-2-256: names per class
    index["id2label"] = {"0": "tabby, tabby cat", "1": "golden retriever"}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=4, norm_num_groups=8, cross_attention_dim=16, sample_size=8,
                                           patch_size=2, caption_channels=16, num_embeds_ada_norm=1000).eval()
    encoder = T5EncoderModel(T5Config(vocab_size=16, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                      pad_token_id=0, eos_token_id=1)).eval()
    tokenizer = word_tokenizer(eos="</s>")
    root = tmp_path_factory.mktemp("pixart") / "pipe"
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(), transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # added conditions: 6 size numbers x addition_time_embed_dim 8 + the pooled projection (16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
                                attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16).eval()
    config = CLIPTextConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=8, bos_token_id=0, eos_token_id=0, pad_token_id=0, projection_dim=16)
    tokenizer = word_tokenizer()
    root = tmp_path_factory.mktemp("sdxl") / "pipe"
    StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(config).eval(),
                              text_encoder_2=CLIPTextModelWithProjection(config).eval(), tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
                              add_watermarker=False).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    # joint_attention_dim = the T5 width (32); pooled_projection_dim = two CLIP projections of 16
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32).eval()
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.1)
    config = CLIPTextConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=8, bos_token_id=0, eos_token_id=0, pad_token_id=0, projection_dim=16)
    tokenizer = word_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                                 eos_token_id=1)).eval()
    root = tmp_path_factory.mktemp("sd3") / "pipe"
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                             text_encoder=CLIPTextModelWithProjection(config).eval(), tokenizer=tokenizer,
                             text_encoder_2=CLIPTextModelWithProjection(config).eval(), tokenizer_2=tokenizer,
                             text_encoder_3=t5, tokenizer_3=tokenizer).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    # 1 double- and 2 single-stream blocks; in_channels = 4 latent channels x 2x2 packing; rope axes sum to the head dim
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                         axes_dims_rope=(4, 2, 2), guidance_embeds=True).eval()
    vae = tiny_vae(scaling_factor=1.5, shift_factor=0.1)
    config = CLIPTextConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=8, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    tokenizer = word_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0,
                                 eos_token_id=1)).eval()
    root = tmp_path_factory.mktemp("flux") / "pipe"
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                 text_encoder=CLIPTextModel(config).eval(), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
                 transformer=transformer).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def dit(dit_dir):
    a = DiTAdapter.from_pretrained(dit_dir, steps=STEPS, t_edit=500, class_label="golden retriever", scale=3.0)
    a.set_directions(torch.randn(2, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    return a


@pytest.fixture(scope="module")
def pixart(pixart_dir):
    a = PixArtAdapter.from_pretrained(pixart_dir, steps=STEPS, t_edit=500, prompt="a photo of a cat", scale=3.0,
                                      max_sequence_length=8)
    a.set_directions(torch.randn(2, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    return a


def hooked(block, alpha, vector, window):
    """A forward hook adding alpha[i] * vector to item i of both guidance halves on the calls in ``window``."""
    calls = []

    def hook(module, args, out):
        calls.append(len(calls))
        return out + alpha.repeat(2).view(-1, *[1] * (out.ndim - 1)) * vector if len(calls) - 1 in window else out

    return block.register_forward_hook(hook), calls


def run_pixart(pipe, latents):
    """The PixArt pipeline at 16 px wide from ``latents`` (one image each), guidance 4.5, STEPS steps."""
    return pipe(prompt="a photo of a cat", latents=latents, num_images_per_prompt=len(latents), guidance_scale=4.5,
                num_inference_steps=STEPS, height=16, width=16, max_sequence_length=8, clean_caption=False,
                use_resolution_binning=False, output_type="pt").images


def test_sites_shapes_and_declarations(dit, pixart):
    for a, kind in ((dit, "DiTTransformer2DModel"), (pixart, "PixArtTransformer2DModel")):
        assert str(a.site) == "transformer_blocks.2.output"  # the middle of 4 blocks
        assert a.h_shape() == (16, 16)  # (tokens = (8/2)^2, width 2 heads x 8)
        assert a.image_shape == (4, 8, 8) and a.copies == 2
        assert a.describe()["denoiser"] == kind
        assert a.capabilities <= set(KNOWN_CAPABILITIES)
    assert dit.timesteps == [666, 333, 0] and dit.edit_calls == slice(0, 1)  # DDIM; t >= 500: the first step
    assert pixart.timesteps == [999, 666, 333] and pixart.edit_calls == slice(0, 2)  # DPM-Solver++
    assert dit.class_label == 1 and dit.describe()["class_names"] == ["golden retriever"]


def test_dit_matches_pipeline_unedited_and_with_a_hook_edit(dit, dit_dir):
    pipe = DiTPipeline.from_pretrained(dit_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = [1] * 3

    def run_pipe():
        return pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=STEPS, output_type="pt",
                    generator=torch.Generator().manual_seed(SEED)).images

    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))  # the pipeline's own draw
    plain = run_pipe()
    assert (dit.sample(x) - plain).abs().max() <= TOL
    alpha = torch.tensor([-2.0, 0.0, 2.0])
    v = dit.directions[0] * 3.0
    handle, calls = hooked(pipe.transformer.transformer_blocks[2], alpha, v, window={0})
    try:
        ref = run_pipe()
    finally:
        handle.remove()
    assert len(calls) == STEPS
    got = dit.sample_edited(x, alpha, v)
    assert (got - ref).abs().max() <= TOL
    assert (got[1] - plain[1]).abs().max() <= TOL  # alpha = 0: the unedited pipeline output
    assert (got[2] - plain[2]).abs().max() > 0.05  # the edit shows


def test_pixart_traverse_matches_pipeline_with_a_hook_edit(pixart, pixart_dir):
    pipe = PixArtAlphaPipeline.from_pretrained(pixart_dir)
    pipe.set_progress_bar_config(disable=True)
    bases = pixart.sample_bases(2, seed=SEED)
    strengths = [-2.0, 0.0, 2.0]
    traversal = pixart.traverse([1], bases, strengths)[0]
    assert traversal.images.shape == (2, 1, 3, 3, 16, 16)  # 8x8 latents decoded to 16x16
    x = bases[:, None].expand(2, 3, 4, 8, 8).reshape(6, 4, 8, 8)  # the traversal's batch: (base, strength)
    alpha = torch.tensor(strengths).repeat(2)

    plain = run_pixart(pipe, x)
    handle, calls = hooked(pipe.transformer.transformer_blocks[2], alpha, pixart.directions[1] * 3.0, window={0, 1})
    try:
        ref = run_pixart(pipe, x)
    finally:
        handle.remove()
    got = traversal.images[:, 0].reshape(6, 3, 16, 16)
    assert len(calls) == STEPS and (got - ref).abs().max() <= TOL
    assert (traversal.images[:, 0, 1] - plain.view(2, 3, 3, 16, 16)[:, 1]).abs().max() <= TOL  # alpha = 0
    assert (got - plain).abs().amax(dim=(1, 2, 3))[[0, 2, 3, 5]].min() > 0.05


def test_sdxl_matches_pipeline_with_a_hook_edit_on_the_mid_block(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    a = SDXLAdapter.from_pretrained(sdxl_dir, steps=STEPS, t_edit=500, prompt="a photo of a cat", scale=3.0)
    assert str(a.site) == "mid_block.output" and a.h_shape() == (32, 4, 4) and a.timesteps == [999, 499, 0]
    a.set_directions(torch.randn(1, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    bases = a.sample_bases(1, seed=SEED)
    strengths = [-2.0, 0.0, 2.0]
    x, alpha = bases.expand(3, 4, 8, 8), torch.tensor(strengths)

    def run_pipe():  # Euler: the pipeline scales the latents by init_noise_sigma, as the adapter does
        return pipe(prompt="a photo of a cat", latents=x, num_images_per_prompt=3, guidance_scale=5.0,
                    num_inference_steps=STEPS, output_type="pt").images

    plain = run_pipe()
    handle, calls = hooked(pipe.unet.mid_block, alpha, a.directions[0] * 3.0, window={0})
    try:
        ref = run_pipe()
    finally:
        handle.remove()
    got = a.traverse([0], bases, strengths)[0].images[0, 0]
    assert len(calls) == STEPS and (got - ref).abs().max() <= TOL
    assert (got[1] - plain[1]).abs().max() <= TOL and (got[2] - plain[2]).abs().max() > 0.05


def test_sd3_edits_the_image_stream_entering_the_middle_block(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    a = SD3Adapter.from_pretrained(sd3_dir, steps=STEPS, t_edit=500, prompt="a photo of a cat", scale=3.0, max_sequence_length=8)
    assert str(a.site) == "transformer_blocks.2.input" and a.h_shape() == (16, 16)
    assert a.timesteps == [1000, 500, 1] and a.edit_calls == slice(0, 2)  # flow matching, t in [0, 1000]
    a.set_directions(torch.randn(1, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    bases = a.sample_bases(1, seed=SEED)
    x, alpha = bases.expand(3, 4, 8, 8), torch.tensor([-2.0, 0.0, 2.0])
    v = a.directions[0] * 3.0

    def run_pipe():
        return pipe(prompt="a photo of a cat", latents=x, num_images_per_prompt=3, guidance_scale=7.0,
                    num_inference_steps=STEPS, max_sequence_length=8, output_type="pt").images

    calls = []

    def pre_hook(module, args, kwargs):  # the image tokens are the block's hidden_states keyword
        calls.append(len(calls))
        if len(calls) - 1 in (0, 1):
            kwargs = kwargs | {"hidden_states": kwargs["hidden_states"] + alpha.repeat(2).view(-1, 1, 1) * v}
        return args, kwargs

    plain = run_pipe()
    handle = pipe.transformer.transformer_blocks[2].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        ref = run_pipe()
    finally:
        handle.remove()
    got = a.traverse([0], bases, [-2.0, 0.0, 2.0])[0].images[0, 0]
    assert len(calls) == STEPS and (got - ref).abs().max() <= TOL
    assert (got[1] - plain[1]).abs().max() <= TOL and (got[2] - plain[2]).abs().max() > 0.05
    with pytest.raises(ValueError, match=r"would change the text tokens; use transformer_blocks.1.input"):
        SD3Adapter(pipe, site="transformer_blocks.1.output")


def test_flux_true_guidance_packing_and_shifted_schedule_match_the_pipeline(flux_dir):
    from diffusers import FluxPipeline

    options = dict(prompt="a photo of a cat", negative_prompt="a face", true_cfg_scale=3.0, guidance_scale=2.5,
                   max_sequence_length=8, resolution=16)
    a = FluxAdapter.from_pretrained(flux_dir, steps=STEPS, t_edit=500, edit_scale=3.0, **options)
    assert str(a.site) == "single_transformer_blocks.0.input"  # the middle of 1 double + 2 single blocks
    assert a.image_shape == (4, 8, 8) and a.h_shape() == (16, 16) and a.copies == 2  # 4x4 packed tokens
    assert a.timesteps == [1000, 759, 441] and a.edit_calls == slice(0, 2)  # sigmas shifted by mu, as the pipeline
    a.set_directions(torch.randn(1, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    bases = a.sample_bases(1, seed=SEED)
    x, alpha = bases.expand(3, 4, 8, 8), torch.tensor([-2.0, 0.0, 2.0])
    v = a.directions[0] * 3.0
    packed = FluxPipeline._pack_latents(x, 3, 4, 8, 8)

    def run_pipe():
        return pipe(latents=packed, num_images_per_prompt=3, num_inference_steps=STEPS, height=16, width=16,
                    output_type="pt", **{k: w for k, w in options.items() if k != "resolution"}).images

    calls = []

    def pre_hook(module, args, kwargs):  # true CFG: two separate passes per step, both edited
        calls.append(len(calls))
        if (len(calls) - 1) // 2 in (0, 1):
            kwargs = kwargs | {"hidden_states": kwargs["hidden_states"] + alpha.view(-1, 1, 1) * v}
        return args, kwargs

    plain = run_pipe()
    handle = pipe.transformer.single_transformer_blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        ref = run_pipe()
    finally:
        handle.remove()
    got = a.traverse([0], bases, [-2.0, 0.0, 2.0])[0].images[0, 0]
    assert len(calls) == 2 * STEPS and (got - ref).abs().max() <= TOL
    assert (got[1] - plain[1]).abs().max() <= TOL and (got[2] - plain[2]).abs().max() > 0.05
    with pytest.raises(ValueError, match="FLUX's joint blocks return"):
        FluxAdapter(pipe, site="single_transformer_blocks.1.output")


def test_pca_and_pullback_directions_at_the_block(dit, pixart, sd3_dir, flux_dir):
    sd3 = SD3Adapter.from_pretrained(sd3_dir, steps=2, t_edit=0, scale=1.0, max_sequence_length=8)
    flux = FluxAdapter.from_pretrained(flux_dir, steps=2, t_edit=0, scale=1.0, max_sequence_length=8, resolution=16)
    for a in (sd3, flux):
        a.set_directions(torch.randn(1, 16, 16))
    for a in (dit, pixart, sd3, flux):
        saved = a.directions
        try:
            found = find_directions(a, "pca", 3)
            assert found.vectors.shape == (3, 16, 16) and found.provenance["site"] == str(a.site)
            assert a.n_latents == 3
            pulled = pullback(a, n_directions=2, n_iter=2)  # the Jacobian of the conditional pass
            assert pulled.vectors.shape == (2, 16, 16) and pulled.x_vectors.shape == (2, 4, 8, 8)
        finally:
            a.set_directions(saved)


def test_any_block_and_guidance_off(dit_dir):
    a = DiTAdapter.from_pretrained(dit_dir, steps=2, t_edit=0, class_label=0, guidance_scale=1.0, site="transformer_blocks.0.output")
    assert a.copies == 1 and str(a.site) == "transformer_blocks.0.output"
    pipe = DiTPipeline.from_pretrained(dit_dir)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(class_labels=[0, 0], guidance_scale=1.0, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(SEED)).images
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))
    assert (a.sample(x) - plain).abs().max() <= TOL


def test_bfloat16_runs_the_whole_pipeline_in_that_dtype(flux_dir, sdxl_dir):
    for a in (FluxAdapter.from_pretrained(flux_dir, dtype="bfloat16", steps=2, t_edit=0, edit_scale=2.0, max_sequence_length=8,
                                          resolution=16),
              SDXLAdapter.from_pretrained(sdxl_dir, dtype="bfloat16", steps=2, t_edit=0, edit_scale=2.0)):
        assert a.dtype == torch.bfloat16 and a.vae.dtype == torch.bfloat16
        a.set_directions(torch.randn(1, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
        images = a.traverse([0], a.sample_bases(1), [-1.0, 1.0])[0].images
        assert images.dtype == torch.float32 and torch.isfinite(images).all() and images.shape[-2:] == (16, 16)


def test_explainer_end_to_end_writes_results(pixart, tmp_path):
    from latentexplainer_plugin.attribution import LatentExplainer
    from latentexplainer_plugin.run import explain_to_dir
    from latentexplainer_plugin.store import read_results

    explainer = LatentExplainer(pixart, bias="combination", samples=2, similarity="bow", strengths=[-2.0, 0.0, 2.0])
    explain_to_dir(explainer, tmp_path / "run", target=[0, 1], progress=False)
    data = read_results(tmp_path / "run" / "results.json")
    assert [e["id"] for e in data["latents"]] == ["dir0", "dir1"]
    assert data["adapter"]["name"] == "pixart" and data["adapter"]["prompt"] == "a photo of a cat"
    for entry in data["latents"]:
        assert entry["status"] == "ok" and (tmp_path / "run" / entry["strip"]).is_file()


def test_class_labels_and_options_are_checked(dit_dir):
    labels = {"tabby": 0, "tabby cat": 0, "golden retriever": 1}
    assert DiTAdapter.resolve_label("Golden Retriever", labels, 1000) == 1
    assert DiTAdapter.resolve_label("207", labels, 1000) == 207
    with pytest.raises(ValueError, match="'golden retreiver' is not a class name.*closest names: golden retriever"):
        DiTAdapter.resolve_label("golden retreiver", labels, 1000)
    with pytest.raises(ValueError, match=r"class index in 0\.\.999"):
        DiTAdapter.resolve_label(1000, labels, 1000)
    with pytest.raises(ValueError, match="no id2label names"):
        DiTAdapter.resolve_label("cat", {}, 1000)
    assert validate_options(DiTAdapter, {"class_label": "tabby", "steps": 4}, "the dit adapter") == {"class_label": "tabby", "steps": 4}
    with pytest.raises(OptionError, match=r"prompt.*its options: .*class_label"):
        validate_options(DiTAdapter, {"prompt": "a cat"}, "the dit adapter")
    with pytest.raises(OptionError, match="guidance_scale"):
        validate_options(PixArtAdapter, {"guidance_scale": -1}, "the pixart adapter")
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        PixArtAdapter(DiTPipeline.from_pretrained(dit_dir), prompt=" ")


def test_loading_refuses_other_pipelines_and_pickles(dit_dir, tmp_path):
    with pytest.raises(LoadError, match="describes a DiTPipeline, not a PixArtAlphaPipeline or PixArtSigmaPipeline"):
        PixArtAdapter.from_pretrained(dit_dir)
    with pytest.raises(LoadError, match="has no model_index.json"):
        DiTAdapter.from_pretrained(tmp_path)
    pickled = tmp_path / "pickled"
    DiTPipeline.from_pretrained(dit_dir).save_pretrained(pickled, safe_serialization=False)
    (pickled / "model_index.json").write_text((dit_dir / "model_index.json").read_text())
    with pytest.raises(LoadError, match="pickle"):
        DiTAdapter.from_pretrained(pickled)


@pytest.mark.parametrize("family, options", [
    ("dit", ["-o", "class_label=golden retriever"]),
    ("pixart", ["-o", "prompt=a cat", "-o", "max_sequence_length=8"]),
    ("sd3", ["-o", "prompt=a cat", "-o", "max_sequence_length=8"]),
    ("flux", ["-o", "prompt=a cat", "-o", "max_sequence_length=8", "-o", "resolution=16"]),
    ("sdxl", ["-o", "prompt=a cat"]),
])
def test_cli_explains_each_family_without_adapter(request, tmp_path, family, options):
    from latentexplainer_plugin.cli import main
    from latentexplainer_plugin.store import read_results

    model = request.getfixturevalue(f"{family}_dir")
    out = tmp_path / "run"
    code = main(["explain", "--model", str(model), *options, "--direction", "pca", "--n-directions", "2", "--steps", "2",
                 "--t-edit", "0", "--edit-scale", "2", "--samples", "2", "--similarity", "bow", "--out", str(out), "--quiet"])
    assert code == 0
    data = read_results(out / "results.json")
    assert data["adapter"]["name"] == family  # chosen from model_index.json
    assert [e["status"] for e in data["latents"]] == ["ok", "ok"]
    assert all((out / e["strip"]).is_file() for e in data["latents"])


def record_updates(block, index=None):
    """Torch hooks on ``block`` recording its update output - input on every call (``index``: the tuple
    element of the output that continues the input; the input is the first positional argument or the
    ``hidden_states`` keyword)."""
    seen, updates = [], []

    def pre(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    def post(module, args, kwargs, out):
        updates.append((out if index is None else out[index]) - seen.pop())

    return [block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post, with_kwargs=True)], updates


@pytest.mark.parametrize("family, site, index", [
    ("dit", "transformer_blocks.1", None),
    ("sd3", "transformer_blocks.1", 1),  # a joint block: (text, image) out; the image stream's update
    ("flux", "transformer_blocks.0", 1),  # a double-stream block
    ("flux", "single_transformer_blocks.1", 1),
    ("sdxl", "mid_block", None),
    ("sdxl", "down_blocks.1.attentions.0", 0),  # a Transformer2DModel returning (hidden_states,): the SDXL-Turbo SAE sites
])
def test_update_site_capture_equals_a_hook_reference(request, family, site, index):
    options = {"dit": {}, "sd3": {"max_sequence_length": 8}, "flux": {"max_sequence_length": 8, "resolution": 16},
               "sdxl": {}}[family]
    cls = {"dit": DiTAdapter, "sd3": SD3Adapter, "flux": FluxAdapter, "sdxl": SDXLAdapter}[family]
    a = cls.from_pretrained(request.getfixturevalue(f"{family}_dir"), steps=2, t_edit=0, edit_scale=1.0,
                            site=f"{site}.update", **options)
    assert str(a.site) == f"{site}.update"
    bases = a.sample_bases(2, seed=SEED)
    got = a.capture_h(bases, window_only=False)  # the conditional copy of every step
    block = a.unet.get_submodule(site)
    handles, updates = record_updates(block, index)
    try:
        a.sample(bases)
    finally:
        for h in handles:
            h.remove()
    ref = torch.stack([u[-2:] for u in updates], dim=1)
    assert got.shape == ref.shape == (2, 2, *a.h_shape())
    assert (got - ref).abs().max() <= 1e-5 and ref.abs().max() > 1e-2


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_an_additive_edit_at_an_update_site_equals_the_edit_at_the_block_output(request, family):
    """DiT: against the adapter's own .output site; SD3 (whose .output sites are refused): against the
    pipeline with a hook adding to the image part of the joint block's output."""
    if family == "dit":
        a = DiTAdapter.from_pretrained(request.getfixturevalue("dit_dir"), steps=STEPS, t_edit=500, scale=3.0,
                                       site="transformer_blocks.1.update")
        b = DiTAdapter.from_pretrained(request.getfixturevalue("dit_dir"), steps=STEPS, t_edit=500, scale=3.0,
                                       site="transformer_blocks.1.output")
        v = torch.randn(*a.h_shape(), generator=torch.Generator().manual_seed(4))
        x, alpha = a.sample_bases(1, seed=SEED).expand(3, 4, 8, 8), torch.tensor([-2.0, 0.0, 2.0])
        got, ref = a.sample_edited(x, alpha, v), b.sample_edited(x, alpha, v)
        assert (got - ref).abs().max() <= TOL and (got[2] - got[1]).abs().max() > 0.05
        return
    from diffusers import StableDiffusion3Pipeline

    sd3_dir = request.getfixturevalue("sd3_dir")
    a = SD3Adapter.from_pretrained(sd3_dir, steps=STEPS, t_edit=500, prompt="a photo of a cat", scale=3.0,
                                   max_sequence_length=8, site="transformer_blocks.1.update")
    v = torch.randn(*a.h_shape(), generator=torch.Generator().manual_seed(4))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    x, alpha = a.sample_bases(1, seed=SEED).expand(3, 4, 8, 8), torch.tensor([-2.0, 0.0, 2.0])
    calls = []

    def hook(module, args, out):  # (text, image): add to the image tokens on the first two steps
        calls.append(len(calls))
        if len(calls) - 1 in (0, 1):
            return out[0], out[1] + alpha.repeat(2).view(-1, 1, 1) * v
        return out

    handle = pipe.transformer.transformer_blocks[1].register_forward_hook(hook)
    try:
        ref = pipe(prompt="a photo of a cat", latents=x, num_images_per_prompt=3, guidance_scale=7.0,
                   num_inference_steps=STEPS, max_sequence_length=8, output_type="pt").images
    finally:
        handle.remove()
    got = a.sample_edited(x, alpha, v)
    assert len(calls) == STEPS and (got - ref).abs().max() <= TOL and (got[2] - got[1]).abs().max() > 0.05


def test_cli_explains_an_update_site(dit_dir, sd3_dir, tmp_path, capsys):
    from pathlib import Path

    from latentexplainer_plugin.cli import main
    from latentexplainer_plugin.store import read_results

    out = tmp_path / "run"
    common = ["--direction", "pca", "--n-directions", "2", "--steps", "2", "--t-edit", "0", "--edit-scale", "2", "--samples", "2",
              "--similarity", "bow", "--quiet"]
    code = main(["explain", "--model", str(dit_dir), "--site", "transformer_blocks.1.update", *common, "--out", str(out)])
    assert code == 0
    data = read_results(out / "results.json")
    assert data["adapter"]["name"] == "dit" and data["adapter"]["site"] == "transformer_blocks.1.update"
    assert [e["status"] for e in data["latents"]] == ["ok", "ok"]
    assert all((out / e["strip"]).is_file() for e in data["latents"])
    # a misspelt kind and SD3's refused .output: exit 2, the allowed kinds / sites named, quoted in troubleshooting.md
    doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    capsys.readouterr()
    errors = []
    for model, site in ((dit_dir, "transformer_blocks.1.updat"), (sd3_dir, "transformer_blocks.1.output")):
        assert main(["explain", "--model", str(model), "--site", site, *common, "--out", str(tmp_path / "bad")]) == 2
        errors.append(capsys.readouterr().err.strip().splitlines()[-1].replace(str(model), "MODEL"))
        assert errors[-1] in doc, errors[-1]
    assert errors[0].endswith("a site is MODULE.KIND with KIND one of input, output, update (e.g. transformer_blocks.1.update)")
    assert "or transformer_blocks.1.update (the block's update of the image tokens" in errors[1]
    assert not (tmp_path / "bad" / "results.json").exists()


def test_float16_sdxl_decodes_in_float32_like_the_pipeline_and_sd3_does_not(sdxl_dir, sd3_dir):
    """SDXL's rule: a float16 VAE whose config sets force_upcast decodes in float32 (then goes back to
    float16); SD3 (like FLUX, PixArt, DiT) decodes in the VAE's dtype. float16 runs on CPU here."""
    from diffusers import StableDiffusionXLPipeline

    a = SDXLAdapter.from_pretrained(sdxl_dir, dtype="float16", steps=STEPS, t_edit=500, prompt="a photo of a cat", scale=3.0)
    assert a.vae.config.force_upcast and a.dtype == torch.float16 and a.vae.dtype == torch.float16
    a.set_directions(torch.randn(1, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False, dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    bases = a.sample_bases(1, seed=SEED)
    plain = pipe(prompt="a photo of a cat", latents=bases.expand(3, 4, 8, 8).half(), num_images_per_prompt=3,
                 guidance_scale=5.0, num_inference_steps=STEPS, output_type="pt").images
    decoded = []
    handle = a.vae.decoder.register_forward_pre_hook(lambda m, args: decoded.append((args[0].dtype, m.conv_in.weight.dtype)))
    try:
        images = a.traverse([0], bases, [-2.0, 0.0, 2.0])[0].images[0, 0]
    finally:
        handle.remove()
    assert decoded == [(torch.float32, torch.float32)] and a.vae.dtype == torch.float16  # upcast for the decode only
    assert plain.dtype == torch.float32 and (images[1] - plain[1]).abs().max() <= TOL  # strength 0: the pipeline's output
    assert (images[2] - images[1]).abs().max() > 0.05

    sd3 = SD3Adapter.from_pretrained(sd3_dir, dtype="float16", steps=2, t_edit=0, edit_scale=1.0, max_sequence_length=8)
    decoded.clear()
    handle = sd3.vae.decoder.register_forward_pre_hook(lambda m, args: decoded.append((args[0].dtype, m.conv_in.weight.dtype)))
    try:
        sd3.sample(sd3.sample_bases(1))
    finally:
        handle.remove()
    assert sd3.vae.config.force_upcast and decoded == [(torch.float16, torch.float16)]


@pytest.fixture(scope="module")
def pixart1024_dir(tmp_path_factory, pixart_dir):
    """PixArt-alpha's 1024-px layout: sample_size 128 switches on the size conditions (use_additional_conditions)."""
    torch.manual_seed(0)
    # width 24: the size conditions take a third of it each (resolution: 2 x 8, aspect ratio: 8)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                           num_layers=4, norm_num_groups=8, cross_attention_dim=24, sample_size=128,
                                           patch_size=2, caption_channels=16, num_embeds_ada_norm=1000).eval()
    assert transformer.use_additional_conditions
    small = PixArtAlphaPipeline.from_pretrained(pixart_dir)
    root = tmp_path_factory.mktemp("pixart1024") / "pipe"
    PixArtAlphaPipeline(tokenizer=small.tokenizer, text_encoder=small.text_encoder, vae=small.vae, transformer=transformer,
                        scheduler=small.scheduler).save_pretrained(root)
    return root


def test_pixart_1024_size_conditions_match_the_pipeline(pixart1024_dir):
    """At a small resolution (16 px: 8x8 latents) the pipeline, without resolution binning, conditions
    on (16, 16) and aspect ratio 1; the adapter must do the same, edited and unedited."""
    a = PixArtAdapter.from_pretrained(pixart1024_dir, steps=STEPS, t_edit=500, prompt="a photo of a cat", scale=3.0,
                                      max_sequence_length=8, resolution=16)
    assert a.image_shape == (4, 8, 8) and a.h_shape() == (16, 24) and a.describe()["resolution"] == 16
    cond, uncond = a.conditioning()
    assert cond["added_cond_kwargs"]["resolution"].tolist() == [[16.0, 16.0]]
    assert cond["added_cond_kwargs"]["aspect_ratio"].tolist() == [[1.0]] and uncond["added_cond_kwargs"] is cond["added_cond_kwargs"]
    assert PixArtAdapter.from_pretrained(pixart1024_dir, steps=2, max_sequence_length=8).image_shape == (4, 128, 128)
    a.set_directions(torch.randn(1, *a.h_shape(), generator=torch.Generator().manual_seed(1)))
    pipe = PixArtAlphaPipeline.from_pretrained(pixart1024_dir)
    pipe.set_progress_bar_config(disable=True)
    bases = a.sample_bases(1, seed=SEED)
    x, alpha = bases.expand(3, 4, 8, 8), torch.tensor([-2.0, 0.0, 2.0])

    plain = run_pixart(pipe, x)
    handle, calls = hooked(pipe.transformer.transformer_blocks[2], alpha, a.directions[0] * 3.0, window={0, 1})
    try:
        ref = run_pixart(pipe, x)
    finally:
        handle.remove()
    got = a.traverse([0], bases, [-2.0, 0.0, 2.0])[0].images[0, 0]
    assert len(calls) == STEPS and (got - ref).abs().max() <= TOL
    assert (got[1] - plain[1]).abs().max() <= TOL and (got[2] - plain[2]).abs().max() > 0.05
    # the conditions matter: the model without them (the 512-px branch) gives other images
    wrong = a.conditioning
    try:
        a.conditioning = lambda: tuple(c | {"added_cond_kwargs": c["added_cond_kwargs"] | {"resolution": c["added_cond_kwargs"]["resolution"] * 64}}
                                       for c in wrong())
        a.driver = a._make_driver(STEPS).eval()
        assert (a.sample(bases) - plain[1]).abs().max() > 1e-3
    finally:
        del a.conditioning
    with pytest.raises(ValueError, match=r"resolution must be a multiple of 4 pixels \(VAE scale factor 2 x patch") as info:
        PixArtAdapter.from_pretrained(pixart1024_dir, max_sequence_length=8, resolution=18)
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()
    quoted = re.sub(r"\d+", "N", doc)  # troubleshooting.md quotes the message at PixArt's real sizes
    assert f"error: --model MODEL: {re.sub(r'[0-9]+', 'N', str(info.value))}\n" in quoted


def test_pca_and_pullback_at_update_sites_of_joint_blocks(sd3_dir, flux_dir):
    """The pull-back differentiates the image stream's update output[1] - hidden_states of a joint block."""
    from latentexplainer_plugin.directions.pullback import site_function

    sd3 = SD3Adapter.from_pretrained(sd3_dir, steps=2, t_edit=0, scale=1.0, max_sequence_length=8,
                                     site="transformer_blocks.1.update")
    flux = FluxAdapter.from_pretrained(flux_dir, steps=2, t_edit=0, scale=1.0, max_sequence_length=8, resolution=16,
                                       site="single_transformer_blocks.0.update")
    for a, block in ((sd3, "transformer_blocks.1"), (flux, "single_transformer_blocks.0")):
        found = find_directions(a, "pca", 3)
        assert found.vectors.shape == (3, 16, 16) and found.provenance["site"] == f"{block}.update"
        pulled = pullback(a, n_directions=2, n_iter=2)
        assert pulled.vectors.shape == (2, 16, 16) and pulled.x_vectors.shape == (2, 4, 8, 8)
        # the function the pull-back differentiates is the hooked update of the conditional pass
        x = a.sample_bases(1, seed=3).to(a.dtype)
        t = a.timesteps[0]
        f = site_function(a.unet, a.unet.get_submodule(block), "update", t, a.driver.unet_kwargs)
        handles, updates = record_updates(a.unet.get_submodule(block), 1)
        try:
            with torch.no_grad():
                got = f(x)
                a.unet(x, t, return_dict=False, **a.driver.unet_kwargs(1))
        finally:
            for h in handles:
                h.remove()
        assert (got - updates[-1]).abs().max() <= 1e-6 and got.abs().max() > 1e-2


@pytest.mark.parametrize("family, site, index", [
    ("dit", "transformer_blocks.2.output", None),
    ("pixart", "transformer_blocks.1.output", None),
    ("sdxl", "mid_block.output", None),  # a (B, C, H, W) map: features along C
    ("sd3", "transformer_blocks.1.update", 1),  # a joint block's image stream
    ("flux", "single_transformer_blocks.1.update", 1),
])
def test_sae_feature_steering_in_every_family_equals_a_torch_hook(request, family, site, index):
    """SAE features as latents: feature k := a on every step of the edit window, both guidance halves,
    against a forward hook applying h + (a - f_k(h)) d_k by hand (at an update site: to out - in)."""
    from latentexplainer_plugin.sae import SAEFeatureAdapter
    from latentexplainer_plugin.types import Site
    try:
        from tests.test_sae_sampling import steer_by_hand, topk_sae
    except ImportError:  # tests/ on sys.path instead of the repository root
        from test_sae_sampling import steer_by_hand, topk_sae  # type: ignore

    options = {"dit": {}, "pixart": {"prompt": "a photo of a cat", "max_sequence_length": 8}, "sdxl": {"prompt": "a cat"},
               "sd3": {"prompt": "a cat", "max_sequence_length": 8},
               "flux": {"prompt": "a cat", "max_sequence_length": 8, "resolution": 16}}[family]
    cls = {"dit": DiTAdapter, "pixart": PixArtAdapter, "sdxl": SDXLAdapter, "sd3": SD3Adapter, "flux": FluxAdapter}[family]
    a = cls.from_pretrained(request.getfixturevalue(f"{family}_dir"), steps=STEPS, t_edit=500, **options)
    shape = a.h_shape(site=Site.parse(site))
    sae = topk_sae(shape[0] if len(shape) == 3 else shape[-1], d_sae=24, k=3, seed=1)
    adapter = SAEFeatureAdapter(a, sae, site=site, features=[2], strengths="absolute", stats_bases=2)
    window = set(range(STEPS)[a.edit_calls])
    bases = a.sample_bases(2, seed=SEED)
    strengths = torch.tensor([0.0, 4.0])
    (t,) = adapter.traverse([0], bases, strengths)

    def steer(h, value):
        return steer_by_hand(h.movedim(1, -1), sae, 2, value).movedim(-1, 1) if h.ndim == 4 else steer_by_hand(h, sae, 2, value)

    block = a.unet.get_submodule(site.rsplit(".", 1)[0])
    for j, value in enumerate(strengths.tolist()):
        calls, seen = [], []

        def pre(module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])

        def post(module, args, kwargs, out, value=value):
            calls.append(1)
            inputs = seen.pop()
            if len(calls) - 1 not in window:
                return out
            if index is None:
                return steer(out, value)
            parts = list(out)
            parts[index] = inputs + steer(parts[index] - inputs, value)
            return tuple(parts)

        handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
                   block.register_forward_hook(post, with_kwargs=True)]
        try:
            want = a.sample(bases)
        finally:
            for h in handles:
                h.remove()
        assert len(calls) == STEPS
        assert (t.images[:, 0, j] - want).abs().max().item() <= TOL, family
    assert (t.images[:, 0, 1] - t.images[:, 0, 0]).abs().max().item() > 1e-3  # the steering shows
