"""Cost of a traversal through the transformer-diffusion adapters, against the plain diffusers pipeline call.

Per family (DiT, PixArt, SD3, FLUX, SDXL), one batch of (1 base x strengths) images with a random pipeline built
from a config, two ways, timed ``--repeats`` times, interleaved:
  pipeline  the diffusers pipeline's own __call__ on a batch of the same size (DiT: its own noise
            draw; the others: given latents), no edit
  adapter   the adapter's traverse: one nnsight trace over the whole guided loop, the edit at the
            default site on every step of the edit window, VAE decode
Reported: minimum and median wall time, minimum CPU time of this process; ratio = adapter / pipeline
from the minima (goal <= 1.10x).

    python benchmarks/bench_transformer_diffusion.py --threads 1
    python benchmarks/bench_transformer_diffusion.py --device cuda --dtype float16 --steps 50 --size 32 --layers 28 --width 1152
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _text_parts(clip_dim: int, t5_dim: int, projection: bool):
    """A WordLevel tokenizer, two CLIP text encoders (with / without projection) and a T5 encoder, random."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config,
                              T5EncoderModel)

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat"]
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                        model_max_length=16)
    clip = CLIPTextConfig(vocab_size=16, hidden_size=clip_dim, intermediate_size=2 * clip_dim, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                          projection_dim=clip_dim)
    clip_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=t5_dim, d_kv=16, d_ff=2 * t5_dim, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1))
    return tokenizer, clip_cls(clip), clip_cls(clip), t5


def build(family: str, root: Path, size: int, layers: int, width: int, heads: int):
    """Save a random pipeline of ``family`` in ``root``; return its pipeline class."""
    import diffusers as d

    torch.manual_seed(0)
    latent = 16 if family in ("sd3", "flux") else 4
    vae = d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=latent,
                          norm_num_groups=32, sample_size=size * 2, shift_factor=0.1 if latent == 16 else None)
    head_dim = width // heads
    common = dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
                  num_layers=layers, sample_size=size, patch_size=2, num_embeds_ada_norm=1000)
    if family == "dit":
        pipe = d.DiTPipeline(d.DiTTransformer2DModel(**common, norm_num_groups=32), vae, d.DDIMScheduler())
    elif family == "pixart":
        tokenizer, _, _, t5 = _text_parts(64, 64, False)
        pipe = d.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=vae, scheduler=d.DPMSolverMultistepScheduler(),
                                     transformer=d.PixArtTransformer2DModel(**common, cross_attention_dim=width, caption_channels=64))
    elif family == "sd3":
        tokenizer, clip1, clip2, t5 = _text_parts(64, 128, True)
        transformer = d.SD3Transformer2DModel(sample_size=size, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                                              attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=128,
                                              caption_projection_dim=width, pooled_projection_dim=128)
        pipe = d.StableDiffusion3Pipeline(transformer=transformer, scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae,
                                          text_encoder=clip1, tokenizer=tokenizer, text_encoder_2=clip2, tokenizer_2=tokenizer,
                                          text_encoder_3=t5, tokenizer_3=tokenizer)
    elif family == "flux":
        tokenizer, clip1, _, t5 = _text_parts(64, 128, False)
        rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
        transformer = d.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=max(1, layers // 3),
                                               num_single_layers=layers - max(1, layers // 3), attention_head_dim=head_dim,
                                               num_attention_heads=heads, joint_attention_dim=128, pooled_projection_dim=64,
                                               axes_dims_rope=rope, guidance_embeds=True)
        pipe = d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=clip1,
                              tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer)
    elif family == "sdxl":
        tokenizer, clip1, clip2, _ = _text_parts(64, 64, True)
        unet = d.UNet2DConditionModel(sample_size=size, in_channels=4, out_channels=4, block_out_channels=(width // 2, width),
                                      layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
                                      norm_num_groups=32, attention_head_dim=head_dim, use_linear_projection=True,
                                      transformer_layers_per_block=(1, max(1, layers // 4)), addition_embed_type="text_time",
                                      addition_time_embed_dim=16, projection_class_embeddings_input_dim=6 * 16 + 64)
        clip1 = _text_parts(64, 64, False)[1]
        pipe = d.StableDiffusionXLPipeline(vae=vae, text_encoder=clip1, text_encoder_2=clip2, tokenizer=tokenizer,
                                           tokenizer_2=tokenizer, unet=unet, scheduler=d.EulerDiscreteScheduler(),
                                           add_watermarker=False)
    else:
        raise SystemExit(f"unknown family {family!r}; use dit, pixart, sd3, flux, sdxl")
    pipe.save_pretrained(root)
    return type(pipe)


def timed(fn, device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="dit,pixart,sd3,flux,sdxl")
    p.add_argument("--size", type=int, default=16, help="latent side (image side = 2 x size with this VAE)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--strengths", default="-3,-1.5,0,1.5,3")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentexplainer_plugin.adapters.pipeline_loading import _dtype_keyword
    from latentexplainer_plugin.plugins import registry

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    strengths = [float(s) for s in args.strengths.split(",")]
    n = len(strengths)
    side = args.size * 2  # image side with the 2-level VAE
    print("command: python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dtype}")
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / family
            cls = build(family, root, args.size, args.layers, args.width, args.heads)
            pipe = cls.from_pretrained(root, **{_dtype_keyword(): dtype}).to(device)
            pipe.set_progress_bar_config(disable=True)
            options = dict(device=args.device, dtype=args.dtype, steps=args.steps, t_edit=0, edit_scale=2.0)
            prompt = dict(prompt="a photo of a cat")
            channels = 16 if family in ("sd3", "flux") else 4
            x = torch.randn(n, channels, args.size, args.size, generator=torch.Generator().manual_seed(0))
            latents = x.to(device, dtype)
            call = dict(num_inference_steps=args.steps, output_type="pt")
            if family == "dit":
                extra, call = dict(class_label=1), call | dict(class_labels=[1] * n, generator=torch.Generator().manual_seed(0))
            elif family == "pixart":
                extra = prompt | dict(max_sequence_length=16)
                call |= prompt | dict(latents=latents, num_images_per_prompt=n, height=side, width=side, max_sequence_length=16,
                                      clean_caption=False, use_resolution_binning=False)
            elif family == "sd3":
                extra = prompt | dict(max_sequence_length=16)
                call |= prompt | dict(latents=latents, num_images_per_prompt=n, height=side, width=side, max_sequence_length=16)
            elif family == "flux":
                extra = prompt | dict(max_sequence_length=16, resolution=side)
                call |= prompt | dict(latents=cls._pack_latents(latents, *latents.shape), num_images_per_prompt=n,
                                      height=side, width=side, max_sequence_length=16)
            else:
                extra = prompt
                call |= prompt | dict(latents=latents, num_images_per_prompt=n, height=side, width=side)
            adapter = registry("adapters").get(family).factory.from_pretrained(root, **options, **extra)

            def plain():
                pipe(**call)

            adapter.set_directions(torch.randn(1, *adapter.h_shape(), generator=torch.Generator().manual_seed(1)))
            bases = x[:1]

            def traverse():
                adapter.traverse([0], bases, strengths)

            traverse(), plain()  # warm up (shape probes, kernels)
            times: dict[str, list[tuple[float, float]]] = {"pipeline": [], "adapter": []}
            for _ in range(args.repeats):
                times["pipeline"].append(timed(plain, device))
                times["adapter"].append(timed(traverse, device))
            print(f"{family}: {type(adapter.transformer).__name__} ({args.layers} blocks, width {args.width}), latents "
                  f"{args.size}x{args.size}, site {adapter.site} {tuple(adapter.h_shape())}, {args.steps} steps, "
                  f"{adapter.copies} denoiser copies per image, batch 1 base x {n} strengths; {args.repeats} runs each")
            print("              wall min  wall median   CPU min")
            for name, rows in times.items():
                walls, cpus = [w for w, _ in rows], [c for _, c in rows]
                print(f"  {name:<10} {min(walls):8.3f}s {statistics.median(walls):10.3f}s {min(cpus):8.3f}s")
            ratio_wall = min(w for w, _ in times["adapter"]) / min(w for w, _ in times["pipeline"])
            ratio_cpu = min(c for _, c in times["adapter"]) / min(c for _, c in times["pipeline"])
            print(f"  adapter / pipeline = {ratio_wall:.3f}x wall, {ratio_cpu:.3f}x CPU   goal <= 1.10x")
            print("  " + json.dumps({"family": family, "ratio_wall": round(ratio_wall, 3), "ratio_cpu": round(ratio_cpu, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
