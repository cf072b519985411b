"""SD3 and FLUX adapters: directions in the image stream of joint-attention ("MMDiT") transformers.

Their blocks return ``(text, image)`` hidden states, so sites are block *inputs*
(``transformer_blocks.N.input``: the image tokens entering block N, the block's ``hidden_states``
argument) or *updates* (``transformer_blocks.N.update``: the image stream's output - input, see
``hooks.sites.UPDATE_OUTPUT_INDEX``); an ``.output`` site on a block is refused (it would edit the text tokens). Both sample
with flow matching (``FlowMatchEulerDiscreteScheduler``): a copy of the pipeline's scheduler gets the
identity ``scale_model_input`` and ``init_noise_sigma`` = 1 that the pipelines imply, so the DDPM
tools (the loop, the pull-back) run unchanged. Everything else is :mod:`.transformer_diffusion`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import Field

from ..options import NonNegativeFloat, PositiveInt
from ..types import Site
from .transformer_diffusion import Conditioning, TransformerDiffusionAdapter, TransformerDiffusionOptions


def refuse_block_output_site(site: Any, family: str, blocks: tuple[str, ...]) -> None:
    """Raise ValueError for an ``.output`` site on a joint block (its output is a (text, image) pair)."""
    if site is None:
        return
    site = Site.parse(site) if isinstance(site, str) else site
    parts = site.path.split(".")
    if site.kind == "output" and len(parts) == 2 and parts[0] in blocks:
        raise ValueError(f"site {site}: {family}'s joint blocks return (text, image) hidden states, and an output edit "
                         f"would change the text tokens; use {site.path}.input (the image tokens entering that block, "
                         f"i.e. the image output of the block before) or {site.path}.update (the block's update of the "
                         "image tokens, output - input)")


def flow_matching_scheduler(scheduler: Any, **set_timesteps_defaults: Any) -> Any:
    """A copy of a flow-matching scheduler with the interface the DDPM tools call (the pipeline's is not touched).

    The pipelines neither scale z_T nor the model input, so ``init_noise_sigma`` is 1 and
    ``scale_model_input`` the identity; ``set_timesteps(n, device)`` fills in ``set_timesteps_defaults``
    (FLUX: its sigma schedule and shift ``mu``), so every caller gets the pipeline's timesteps.
    """
    copy = type(scheduler).from_config(scheduler.config)
    if not hasattr(copy, "scale_model_input"):
        copy.init_noise_sigma = 1.0
        copy.scale_model_input = lambda sample, timestep=None: sample
    if set_timesteps_defaults:
        original = copy.set_timesteps

        def set_timesteps(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
            chosen = {k: (v(num_inference_steps) if callable(v) else v) for k, v in set_timesteps_defaults.items()} | kwargs
            if chosen.get("sigmas") is None:
                chosen["num_inference_steps"] = num_inference_steps
            return original(device=device, **chosen)

        copy.set_timesteps = set_timesteps
    return copy


class SD3Options(TransformerDiffusionOptions):
    """Options of the ``sd3`` adapter."""

    prompt: str = Field("a photograph", min_length=1, description="what every image shows (all three text encoders)")
    negative_prompt: str = Field("", description="what guidance steers away from")
    guidance_scale: NonNegativeFloat = Field(7.0, description="classifier-free guidance weight (<= 1: none)")
    steps: PositiveInt = Field(28, description="denoising steps per image")
    max_sequence_length: PositiveInt = Field(256, description="T5 tokens per prompt")


class SD3Adapter(TransformerDiffusionAdapter):
    """Explain directions in the image stream of a Stable Diffusion 3 MMDiT (``StableDiffusion3Pipeline``).

    SD3's joint blocks return ``(text, image)`` hidden states; the image tokens entering a block are
    its ``hidden_states`` argument, so the default site is ``transformer_blocks.{L//2}.input``: the
    image stream between the two halves of the network (the output of block L//2 - 1). The prompt is
    encoded by the pipeline's own ``encode_prompt`` (CLIP-L, CLIP-G and T5 when present); the
    scheduler is the pipeline's flow-matching Euler, z_T is used as drawn, as in the pipeline.
    """

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    scale_initial_noise = False
    Options = SD3Options

    def __init__(self, pipeline: Any, *, prompt: str = "a photograph", negative_prompt: str = "", guidance_scale: float = 7.0,
                 max_sequence_length: int = 256, steps: int = 28, **options: Any):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}")
        refuse_block_output_site(options.get("site"), "SD3", ("transformer_blocks",))
        pipeline = self.resolve_pipeline(pipeline, options)
        self.prompt, self.negative_prompt, self.max_sequence_length = prompt, negative_prompt, max_sequence_length
        super().__init__(pipeline, guidance_scale=guidance_scale, steps=steps, **options)

    def make_scheduler(self, pipeline: Any) -> Any:
        return flow_matching_scheduler(pipeline.scheduler)

    @torch.no_grad()
    def conditioning(self) -> tuple[Conditioning, Conditioning | None]:
        pipe, device, dtype = self.pipeline, self.transformer.device, self.transformer.dtype
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=self.prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.copies > 1, negative_prompt=self.negative_prompt,
            max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}
        if self.copies == 1:
            return cond, None
        return cond, {"encoder_hidden_states": neg.to(dtype), "pooled_projections": neg_pooled.to(dtype)}

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
                        steps: int = 28, t_edit: int | None = None, allow_pickle: bool = False, **options: Any) -> "SD3Adapter":
        return super().from_pretrained(path_or_id, device=device, dtype=dtype, steps=steps, t_edit=t_edit,
                                       allow_pickle=allow_pickle, **options)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"prompt": self.prompt, "negative_prompt": self.negative_prompt}


class FluxOptions(TransformerDiffusionOptions):
    """Options of the ``flux`` adapter."""

    prompt: str = Field("a photograph", min_length=1, description="what every image shows (CLIP and T5)")
    negative_prompt: str = Field("", description="with true_cfg_scale > 1: what true classifier-free guidance steers away from")
    guidance_scale: NonNegativeFloat = Field(3.5, description="FLUX-dev's distilled guidance (an input of the model, one pass per step)")
    true_cfg_scale: NonNegativeFloat = Field(1.0, description="true classifier-free guidance weight (> 1 with a negative prompt: two passes)")
    steps: PositiveInt = Field(28, description="denoising steps per image")
    max_sequence_length: PositiveInt = Field(512, description="T5 tokens per prompt")
    resolution: Optional[PositiveInt] = Field(None, description="image side in pixels (default: the pipeline's, 1024)")


class FluxAdapter(TransformerDiffusionAdapter):
    """Explain directions in the image stream of a FLUX transformer (``FluxPipeline``).

    Like :class:`SD3Adapter`, sites are block inputs (the blocks return (text, image) pairs); the
    default is the image tokens entering the middle block of all ``transformer_blocks`` +
    ``single_transformer_blocks`` in execution order (FLUX.1: 19 + 38, so
    ``single_transformer_blocks.9.input``), shape (H/2 * W/2 tokens, 3072). Bases are latents
    (n, C, H, W); every denoiser call packs them into 2x2 patches and unpacks the prediction, so
    the loop, the scheduler and the pull-back work with plain latents. ``guidance_scale`` is FLUX-dev's distilled guidance (a model input, ignored by models
    without ``guidance_embeds`` such as schnell); true classifier-free guidance runs only with
    ``true_cfg_scale`` > 1 and a ``negative_prompt``, as in the pipeline. The sigma schedule and its
    resolution-dependent shift ``mu`` are the pipeline's.
    """

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    scale_initial_noise = False
    timestep_divisor = 1000.0
    Options = FluxOptions

    def __init__(self, pipeline: Any, *, prompt: str = "a photograph", negative_prompt: str = "", guidance_scale: float = 3.5,
                 true_cfg_scale: float = 1.0, max_sequence_length: int = 512, resolution: int | None = None, steps: int = 28,
                 **options: Any):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        if not float(guidance_scale) >= 0 or not float(true_cfg_scale) >= 0:
            raise ValueError(f"guidance_scale and true_cfg_scale must be >= 0, got {guidance_scale} and {true_cfg_scale}")
        refuse_block_output_site(options.get("site"), "FLUX", ("transformer_blocks", "single_transformer_blocks"))
        pipeline = self.resolve_pipeline(pipeline, options)
        scale = int(getattr(pipeline, "vae_scale_factor", 8))
        side = int(resolution or getattr(pipeline, "default_sample_size", 128) * scale)
        if side < 2 * scale:
            raise ValueError(f"resolution must be at least {2 * scale} pixels (one packed 2x2 latent patch), got {side}")
        self.latent_side = 2 * (side // (scale * 2))
        self.prompt, self.negative_prompt, self.max_sequence_length = prompt, negative_prompt, max_sequence_length
        self.distilled_guidance, self.true_cfg_scale = float(guidance_scale), float(true_cfg_scale)
        cfg = self.true_cfg_scale if negative_prompt else 1.0  # the pipeline's rule: true CFG needs a negative prompt
        super().__init__(pipeline, guidance_scale=cfg, steps=steps, **options)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return int(self.transformer.config.in_channels) // 4, self.latent_side, self.latent_side

    def make_scheduler(self, pipeline: Any) -> Any:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = pipeline.scheduler.config
        seq_len = (self.latent_side // 2) ** 2
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        flow_sigmas = bool(config.get("use_flow_sigmas", False))
        return flow_matching_scheduler(
            pipeline.scheduler, mu=mu, sigmas=(lambda n: None) if flow_sigmas else (lambda n: np.linspace(1.0, 1 / n, n)))

    @torch.no_grad()
    def conditioning(self) -> tuple[Conditioning, Conditioning | None]:
        pipe, device, dtype = self.pipeline, self.transformer.device, self.transformer.dtype

        def encode(text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return pipe.encode_prompt(prompt=text, prompt_2=None, device=device, num_images_per_prompt=1,
                                      max_sequence_length=self.max_sequence_length)

        embeds, pooled, self._text_ids = encode(self.prompt)
        extra = {}
        if self.transformer.config.guidance_embeds:
            extra["guidance"] = torch.full([1], self.distilled_guidance, device=device, dtype=torch.float32)
        cond = {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)} | extra
        if self.copies == 1:
            return cond, None
        neg, neg_pooled, _ = encode(self.negative_prompt)
        return cond, {"encoder_hidden_states": neg.to(dtype), "pooled_projections": neg_pooled.to(dtype)} | extra

    def shared_kwargs(self) -> dict[str, Any]:
        half = self.latent_side // 2
        img_ids = self.pipeline._prepare_latent_image_ids(1, half, half, self.transformer.device, self.transformer.dtype)
        return {"txt_ids": self._text_ids, "img_ids": img_ids}

    def packing(self, pipeline: Any) -> tuple[Any, Any]:
        cls = type(pipeline)  # the pipeline's own 2x2 patch packing; unpack at vae_scale_factor 1 gives latents back

        def pack(x: torch.Tensor) -> torch.Tensor:
            return cls._pack_latents(x, *x.shape)

        def unpack(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
            return cls._unpack_latents(x, shape[2], shape[3], 1)

        return pack, unpack

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
                        steps: int = 28, t_edit: int | None = None, allow_pickle: bool = False, **options: Any) -> "FluxAdapter":
        return super().from_pretrained(path_or_id, device=device, dtype=dtype, steps=steps, t_edit=t_edit,
                                       allow_pickle=allow_pickle, **options)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                                     "distilled_guidance": self.distilled_guidance, "true_cfg_scale": self.true_cfg_scale,
                                     "resolution": self.latent_side * int(self.pipeline.vae_scale_factor)}
