"""Stable Diffusion adapter: h-space traversals of a text-conditioned UNet, with classifier-free guidance.

Same recipe as :mod:`.diffusion` (one nnsight trace over the whole sampling loop, h <- h + alpha * s * v
at ``mid_block.output`` on the steps with t >= t_edit, strengths as the batch), with three changes:

1. Bases are latent noises (n, 4, h/8, w/8); the prompt is encoded once by the pipeline's text
   encoder (and the negative prompt, for guidance).
2. Classifier-free guidance (Ho & Salimans 2022): the UNet sees [x; x] with [negative; prompt]
   embeddings, eps = eps_neg + g * (eps_prompt - eps_neg). Both halves get the same edit, so the
   guided difference is taken between two edited predictions, never an edited and an unedited one.
3. The final latents are decoded by the pipeline's VAE: x = vae.decode(z / scaling_factor).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..options import NonNegativeFloat
from ..safe_load import LoadError
from .diffusion import DDPMAdapter, DDPMOptions, SamplingLoop, move, parse_dtype


class GuidedSamplingLoop(SamplingLoop):
    """``forward(z_T)``: guided denoising of latents, then the VAE decoder; returns images in [-1, 1].

    The UNet's children and the VAE (as ``vae``) are registered on it, so sites read
    ``mid_block`` and ``vae.decoder``.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, steps: int, vae: nn.Module, context: torch.Tensor,
                 negative: torch.Tensor | None, guidance_scale: float):
        super().__init__(unet, scheduler, steps)
        self.vae = vae
        self.context, self.negative, self.guidance_scale = context, negative, guidance_scale

    def unet_kwargs(self, n: int) -> dict[str, Any]:
        return {"encoder_hidden_states": self.context.expand(n, *self.context.shape[1:])}  # the prompt

    def model_output(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        if self.negative is None:
            return super().model_output(x, t)
        n = len(x)  # 1. classifier-free guidance: one UNet pass over [x; x] with [negative; prompt]
        context = torch.cat([self.negative.expand(n, *self.negative.shape[1:]), self.context.expand(n, *self.context.shape[1:])])
        both = self.scheduler.scale_model_input(torch.cat([x, x]), t)
        neg, pos = self.unet(both, t, encoder_hidden_states=context, return_dict=False)[0].chunk(2)
        return neg + self.guidance_scale * (pos - neg)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        scaling = getattr(getattr(self.vae, "config", None), "scaling_factor", 1.0)
        return self.vae.decode(x / scaling, return_dict=False)[0]  # 3. latents -> image

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (the inverse of :meth:`decode`): the VAE posterior's mean x scaling_factor."""
        scaling = getattr(getattr(self.vae, "config", None), "scaling_factor", 1.0)
        return self.vae.encode(images.to(self.vae.dtype), return_dict=False)[0].mean * scaling


@torch.no_grad()
def encode_prompt(text_encoder: nn.Module, tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    """(1, L, D) text embeddings of ``prompt``, padded to the tokenizer's maximum length."""
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


class StableDiffusionAdapter(DDPMAdapter):
    """Explain h-space directions of a Stable Diffusion UNet for one prompt.

    Args:
        model: a pipeline (with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``),
            a path or hub id of one, or a ``UNet2DConditionModel`` with the other parts as keywords.
        prompt / negative_prompt: what every image shows / is guided away from.
        guidance_scale: classifier-free guidance weight g (<= 1: no guidance, one UNet pass).
        Everything else as :class:`DDPMAdapter` (``steps``, ``t_edit``, ``scale``, ``site``, ...).

    :meth:`invert` encodes images with the VAE (posterior mean x scaling_factor) and runs the guided
    DDIM update backwards (see :meth:`DDPMAdapter.invert_samples`).
    """

    name = "sd"
    capabilities = frozenset({"directions", "sampling_loop", "inversion", "site_edits"})

    class Options(DDPMOptions):
        """Options of the ``sd`` adapter."""

        prompt: str = Field("a photograph", description="the prompt every image is generated from")
        negative_prompt: str = Field("", description="what guidance steers away from")
        guidance_scale: NonNegativeFloat = Field(7.5, description="classifier-free guidance weight (<= 1: none)")

    def __init__(self, model: Any, scheduler: Any = None, *, prompt: str = "a photograph", negative_prompt: str = "",
                 guidance_scale: float = 7.5, vae: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 tokenizer: Any = None, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 model_id: str | None = None, allow_pickle: bool = False, **options: Any):
        if isinstance(model, (str, Path)):
            model_id = model_id or str(model)
            parts = load_stable_diffusion(model, device=device or "cpu", dtype=dtype, allow_pickle=allow_pickle)
            model, scheduler = parts["unet"], scheduler or parts["scheduler"]
            vae, text_encoder, tokenizer = vae or parts["vae"], text_encoder or parts["text_encoder"], tokenizer or parts["tokenizer"]
        elif not isinstance(model, nn.Module) and hasattr(model, "unet"):  # a diffusers pipeline object
            vae, text_encoder = vae or model.vae, text_encoder or model.text_encoder
            tokenizer, scheduler = tokenizer or model.tokenizer, scheduler or model.scheduler
            model = model.unet
        missing = [name for name, part in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)) if part is None]
        if missing:
            raise TypeError(f"StableDiffusionAdapter needs the pipeline's {', '.join(missing)} too (or a pipeline / its directory)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if not float(guidance_scale) >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.prompt, self.negative_prompt, self.guidance_scale = prompt, negative_prompt, float(guidance_scale)
        self.copies = 2 if self.guidance_scale > 1.0 else 1
        target = parse_dtype(dtype)
        self.vae = move(vae, device, target).eval()
        self.text_encoder = text_encoder.to(device=device).eval() if device is not None else text_encoder.eval()
        self.tokenizer = tokenizer
        super().__init__(model, scheduler, device=device, dtype=dtype, model_id=model_id, **options)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
                        steps: int = 50, t_edit: int | None = None, allow_pickle: bool = False,
                        **options: Any) -> "StableDiffusionAdapter":
        """Load a Stable Diffusion pipeline (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``);
        ``allow_pickle`` accepts ``.bin`` weights (see :func:`load_stable_diffusion`)."""
        parts = load_stable_diffusion(path_or_id, device=device, dtype=dtype, allow_pickle=allow_pickle)
        return cls(parts.pop("unet"), parts.pop("scheduler"), steps=steps, t_edit=t_edit, model_id=str(path_or_id),
                   **parts, **options)

    def _make_driver(self, steps: int) -> nn.Module:
        device = next(self.text_encoder.parameters()).device
        context = encode_prompt(self.text_encoder, self.tokenizer, self.prompt, device).to(self.device, self.dtype)
        negative = None
        if self.copies > 1:
            negative = encode_prompt(self.text_encoder, self.tokenizer, self.negative_prompt, device).to(self.device, self.dtype)
        return GuidedSamplingLoop(self.unet, self.scheduler, steps, self.vae, context, negative, self.guidance_scale)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the pipeline makes (and :meth:`invert` takes): latent side x the VAE's scale."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        _, h, w = self.image_shape
        return int(self.vae.config.in_channels), h * factor, w * factor

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                                     "guidance_scale": self.guidance_scale}


def load_stable_diffusion(path_or_id: str | Path, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """The parts of a Stable Diffusion pipeline directory or hub id, with a DDIMScheduler.

    Weights saved only as pickle (``.bin``) are refused unless ``allow_pickle`` (then read with
    weights_only=True); local configs whose sizes would need absurd memory are refused first.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from .diffusion import check_unet_parameters
    from .loading import AUTOENCODER_LIMITS, SCHEDULER_LIMITS, TEXT_ENCODER_LIMITS, UNET_LIMITS
    from .loading import check_config_sizes, check_pickle_policy, use_safetensors

    dtype = parse_dtype(dtype) or torch.float32
    source = str(path_or_id)
    local = Path(source).expanduser()
    if (Path(source).exists() or source.startswith((".", "/", "~"))) and not (local / "unet").is_dir():
        raise LoadError(f"{local} is not a Stable Diffusion pipeline directory (needs unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    low_memory = importlib.util.find_spec("accelerate") is not None
    root = str(local) if local.exists() else source
    if not local.exists():
        from ..hub import hub_problem

        problem = hub_problem(source, "unet/config.json")
        if problem is not None:  # seconds, not the minutes of diffusers' retries
            raise LoadError(f"model={source!r} {problem}; give the local directory of a Stable Diffusion pipeline "
                            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    if local.is_dir():
        from ..safe_load import read_config

        for sub, file, limits in (("unet", "config.json", UNET_LIMITS), ("vae", "config.json", AUTOENCODER_LIMITS),
                                  ("text_encoder", "config.json", TEXT_ENCODER_LIMITS),
                                  ("scheduler", "scheduler_config.json", SCHEDULER_LIMITS)):
            if (local / sub / file).is_file():
                check_config_sizes(read_config(local / sub / file), limits, local / sub / file)
        if (local / "unet" / "config.json").is_file():
            check_unet_parameters(UNet2DConditionModel, local / "unet" / "config.json")
        for sub in ("unet", "vae", "text_encoder"):
            check_pickle_policy(local / sub, allow_pickle, sub)

    def safe(folder: Path) -> bool | None:
        return use_safetensors(allow_pickle, folder if local.is_dir() else None)

    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, low_cpu_mem_usage=low_memory,
                                                         use_safetensors=safe(local / "unet")),
            "vae": AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=low_memory,
                                                 use_safetensors=safe(local / "vae")),
            "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder",
                                                        use_safetensors=safe(local / "text_encoder")),
            "tokenizer": AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
            "scheduler": DDIMScheduler.from_pretrained(root, subfolder="scheduler"),
        }
    except (OSError, ValueError) as exc:
        raise LoadError(f"could not load a Stable Diffusion pipeline from {source}: {exc}") from exc
    for name in ("unet", "vae", "text_encoder"):
        parts[name] = parts[name].to(device).eval()
    return parts
