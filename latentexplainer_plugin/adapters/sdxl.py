"""SDXL adapter: h-space traversals of a ``StableDiffusionXLPipeline``, driven like the transformer adapters.

The UNet is called through :class:`~.transformer_diffusion.DenoiserCall` (a UNet takes
``(x, timestep=, ...)`` too), so the guided loop, the edit window and the directions are those of
:mod:`.transformer_diffusion`; the default site is ``mid_block.output`` (h-space, as for ``sd``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from pydantic import Field

from ..options import NonNegativeFloat, SiteName
from .transformer_diffusion import Conditioning, TransformerDiffusionAdapter, TransformerDiffusionOptions


class SDXLOptions(TransformerDiffusionOptions):
    """Options of the ``sdxl`` adapter."""

    prompt: str = Field("a photograph", min_length=1, description="what every image shows")
    negative_prompt: str = Field("", description="what guidance steers away from ('': zero embeddings, as the pipeline does)")
    site: Optional[SiteName] = Field(None, description="latent site (default: mid_block.output, h-space)")
    guidance_scale: NonNegativeFloat = Field(5.0, description="classifier-free guidance weight (<= 1: none)")


class SDXLAdapter(TransformerDiffusionAdapter):
    """Explain h-space directions (``mid_block.output``, as for ``sd``) of a ``StableDiffusionXLPipeline``.

    The UNet goes through the same driver as the transformers: the prompt is encoded by the
    pipeline's own ``encode_prompt`` (both CLIP encoders; pooled embeddings), the size conditions
    by ``_get_add_time_ids`` at the model's default resolution (original = target size, no crop).
    An empty ``negative_prompt`` gives the zero embeddings the pipeline uses
    (``force_zeros_for_empty_prompt``). The scheduler is the pipeline's own (Euler for SDXL base).
    With ``dtype="float16"`` the decode follows the pipeline: a VAE whose config sets
    ``force_upcast`` (SDXL base's does: it overflows in float16) decodes in float32 and is cast back.
    """

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    denoiser_part = "unet"  # called through DenoiserCall like the transformers: a UNet takes (x, timestep=, ...) too
    upcast_vae = True  # StableDiffusionXLPipeline decodes a float16 VAE with force_upcast in float32
    Options = SDXLOptions

    def __init__(self, pipeline: Any, *, prompt: str = "a photograph", negative_prompt: str = "", guidance_scale: float = 5.0,
                 **options: Any):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        pipeline = self.resolve_pipeline(pipeline, options)
        if getattr(pipeline, "unet", None) is None or getattr(pipeline, "text_encoder_2", None) is None:
            raise TypeError(f"SDXLAdapter needs a StableDiffusionXLPipeline (unet, text_encoder_2), got {type(pipeline).__name__}")
        self.prompt, self.negative_prompt = prompt, negative_prompt
        super().__init__(pipeline, guidance_scale=guidance_scale, **options)

    @torch.no_grad()
    def conditioning(self) -> tuple[Conditioning, Conditioning | None]:
        pipe, device, dtype = self.pipeline, self.transformer.device, self.transformer.dtype
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            self.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=self.copies > 1,
            negative_prompt=self.negative_prompt or None)
        side = int(self.transformer.config.sample_size) * int(pipe.vae_scale_factor)
        time_ids = pipe._get_add_time_ids((side, side), (0, 0), (side, side), dtype=embeds.dtype,
                                          text_encoder_projection_dim=int(pipe.text_encoder_2.config.projection_dim)).to(device)
        cond = {"encoder_hidden_states": embeds.to(dtype),
                "added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}}
        if self.copies == 1:
            return cond, None
        return cond, {"encoder_hidden_states": neg.to(dtype),
                      "added_cond_kwargs": {"text_embeds": neg_pooled.to(dtype), "time_ids": time_ids.to(dtype)}}

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
