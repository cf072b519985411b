"""Transformer diffusion adapters (DiT, PixArt): h-space-style traversals at a transformer block, through nnsight.

The recipe of :mod:`.diffusion` and :mod:`.stable_diffusion` (one nnsight trace over the whole
sampling loop, h <- h + alpha * s * v on every step with t >= t_edit, strengths as the batch), for
denoisers that are transformers over latent patches:

1. Bases are latent noises z_T (n, C, S, S) with S the transformer's ``sample_size``; the final
   latents are decoded by the pipeline's VAE, x = vae.decode(z / scaling_factor + shift_factor).
2. Every denoiser call goes through :class:`DenoiserCall`, which gives a diffusers transformer the
   UNet calling convention ``(x, t, return_dict=False, **conditioning)`` (t broadcast to the batch,
   as the pipelines do), so the DDPM machinery (capture, edit window, auto scale, PCA, pull-back)
   applies unchanged. The transformer's children are registered on the sampling loop, so sites read
   ``transformer_blocks.14``, the transformer's own paths.
3. Classifier-free guidance (Ho & Salimans 2022): the denoiser sees [z; z] with [unconditional;
   conditional] inputs and eps = eps_u + g (eps_c - eps_u); both halves get the same edit. Models
   with a learned variance (``out_channels == 2 * in_channels``) step with the eps half only.
4. The default site is the output hidden states (B, tokens, dim) of the middle transformer block
   (``default_plugins/sites.py`` says why); ``site=`` picks any block.
5. ``invert(images)``: the VAE encoder's posterior mean, scaled as the decode un-does it
   (:meth:`TransformerSamplingLoop.encode`), then the family's own scheduler run backwards with the
   guided model output (:meth:`DDPMAdapter.invert_samples`); so ``--direction conditional --data``
   works for every family here.

Families: :class:`DiTAdapter` (``DiTPipeline``, class-conditional) and :class:`PixArtAdapter`
(``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``, T5-prompt-conditioned) here; SD3 and FLUX (joint
"MMDiT" blocks, flow matching) in :mod:`.mmdit`; SDXL (a UNet driven the same way) in :mod:`.sdxl`;
loading and its checks in :mod:`.pipeline_loading`.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from pydantic import Field
from torch import nn

from ..options import DtypeName, NonNegativeFloat, PositiveInt, SiteName
from .diffusion import DDPMAdapter, DDPMOptions, SamplingLoop, parse_dtype
from .pipeline_loading import load_pipeline

Conditioning = dict[str, Any]  # keyword arguments of the denoiser for ONE item (batch dimension 1), nested dicts allowed


class DenoiserCall(nn.Module):
    """Calls a diffusers transformer as ``(x, t, return_dict=False, **conditioning)``, like a UNet.

    ``t`` (an int or a 0-d / 1-d tensor) is broadcast to the batch, as the pipelines do. The
    transformer's children are registered on this module and it is kept out of the module tree, so
    module paths stay the transformer's own. Move or cast the transformer itself (``.to``) before
    wrapping it: parameters held directly by it (PixArt's ``scale_shift_table``) are not children.
    """

    def __init__(self, model: nn.Module, timestep_divisor: float = 1.0, pack: Any = None, unpack: Any = None):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self._model = (model,)
        self.timestep_divisor = timestep_divisor  # FLUX takes t / 1000
        # FLUX: latents (n, C, H, W) <-> (n, H/2 * W/2, 4C) around the call, so callers work with plain latents
        self._pack, self._unpack = pack, unpack

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, x: torch.Tensor, t: Any, return_dict: bool = False, **conditioning: Any) -> tuple:
        t = torch.as_tensor(t, device=x.device)
        t = (t[None] if t.ndim == 0 else t).expand(len(x))
        if self.timestep_divisor != 1.0:
            t = t.to(x.dtype) / self.timestep_divisor
        if self._pack is None:
            return self.model(x, timestep=t, return_dict=False, **conditioning)
        out = self.model(self._pack(x), timestep=t, return_dict=False, **conditioning)
        return (self._unpack(out[0], x.shape),) + tuple(out[1:])


def _tile(value: Any, n: int) -> Any:
    """Repeat the batch dimension (1) of every tensor in ``value`` (nested dicts, None kept) to ``n``."""
    if isinstance(value, dict):
        return {k: _tile(v, n) for k, v in value.items()}
    if torch.is_tensor(value):
        return value.expand(n, *value.shape[1:])
    return value


def _join(first: Any, second: Any) -> Any:
    """[first; second] along the batch, leaf by leaf."""
    if isinstance(first, dict):
        return {k: _join(first[k], second[k]) for k in first}
    if torch.is_tensor(first):
        return torch.cat([first, second])
    return first


class TransformerSamplingLoop(SamplingLoop):
    """``forward(z_T)``: (guided) denoising of latents by a transformer, then the VAE decoder; images in [-1, 1].

    ``cond`` / ``uncond`` are the denoiser's conditioning keywords for one item; ``uncond`` None
    means no guidance (one pass per step).
    """

    def __init__(self, denoiser: DenoiserCall, scheduler: Any, steps: int, vae: nn.Module, cond: Conditioning,
                 uncond: Conditioning | None, guidance_scale: float, scale_initial_noise: bool = True,
                 shared: dict[str, Any] | None = None, upcast_vae: bool = False):
        super().__init__(denoiser, scheduler, steps)
        self.vae = vae
        self.upcast_vae = upcast_vae  # SDXL's rule: a float16 VAE with force_upcast decodes in float32
        self.cond, self.uncond, self.guidance_scale = cond, uncond, guidance_scale
        self.shared = shared or {}  # keywords without a batch dimension (FLUX's position ids), passed as they are
        self.scale_initial_noise = scale_initial_noise
        config = denoiser.config
        self.latent_channels = int(config.in_channels)
        self.learned_sigma = int(config.out_channels or config.in_channels) == 2 * self.latent_channels

    def unet_kwargs(self, n: int) -> dict[str, Any]:
        return _tile(self.cond, n) | self.shared  # the conditional pass (the pull-back's Jacobian is taken there)

    def model_output(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        n, guided = len(x), self.uncond is not None
        both = torch.cat([x, x]) if guided else x
        if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
            both = self.scheduler.scale_model_input(both, t)
        kwargs = (_join(_tile(self.uncond, n), _tile(self.cond, n)) if guided else _tile(self.cond, n)) | self.shared
        out = self.unet(both, t, return_dict=False, **kwargs)[0]
        if self.learned_sigma:  # the pipelines step with eps only, the variance channels are dropped
            out = out[:, :self.latent_channels]
        if guided:  # classifier-free guidance: eps_u + g (eps_c - eps_u)
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images, as the pipeline decodes: cast to the VAE's dtype, then unscale (SD3 / FLUX: and
        shift; SDXL: de-normalize with ``latents_mean`` / ``latents_std`` when the VAE has them).

        With ``upcast_vae`` (SDXL) a float16 VAE whose config sets ``force_upcast`` is cast to float32
        for the decode and back afterwards, as ``StableDiffusionXLPipeline`` does (such VAEs overflow
        in float16); the other pipelines decode in the VAE's own dtype.
        """
        vae = self.vae
        config = getattr(vae, "config", None)
        with self._vae_dtype():
            x = x.to(vae.dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if self.upcast_vae and mean is not None and std is not None:  # SDXL's de-normalization
                shape = (1, -1) + (1,) * (x.ndim - 2)
                mean, std = (torch.tensor(v).view(shape).to(x.device, x.dtype) for v in (mean, std))
                x = x * std / config.scaling_factor + mean
            else:
                x = x / getattr(config, "scaling_factor", 1.0) + (getattr(config, "shift_factor", None) or 0.0)
            return vae.decode(x, return_dict=False)[0]

    @contextlib.contextmanager
    def _vae_dtype(self) -> Iterator[None]:
        """The VAE in the dtype it encodes and decodes in: float32 for a float16 ``force_upcast`` VAE when
        ``upcast_vae`` (SDXL), back to float16 afterwards; else unchanged."""
        vae = self.vae
        upcast = (self.upcast_vae and vae.dtype == torch.float16
                  and bool(getattr(getattr(vae, "config", None), "force_upcast", False)))
        if upcast:
            vae.to(torch.float32)
        try:
            yield
        finally:
            if upcast:
                vae.to(torch.float16)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents, the inverse of :meth:`decode`: the mean of the VAE encoder's
        posterior (no sampling, so inversion is deterministic), shifted and scaled as the pipelines
        prepare image latents (SDXL: normalized with ``latents_mean`` / ``latents_std`` when present),
        in the same dtype rule as the decode (SDXL: a float16 ``force_upcast`` VAE encodes in float32)."""
        vae = self.vae
        config = getattr(vae, "config", None)
        with self._vae_dtype():
            z = vae.encode(images.to(vae.dtype), return_dict=False)[0].mean
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if self.upcast_vae and mean is not None and std is not None:
                shape = (1, -1) + (1,) * (z.ndim - 2)
                mean, std = (torch.tensor(v).view(shape).to(z.device, z.dtype) for v in (mean, std))
                return (z - mean) * config.scaling_factor / std
            return (z - (getattr(config, "shift_factor", None) or 0.0)) * getattr(config, "scaling_factor", 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sch = self.scheduler
        sch.set_timesteps(self.steps, device=x.device)  # also resets multistep schedulers' state
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(0)
        if self.scale_initial_noise:
            x = x * sch.init_noise_sigma
        extra = {"generator": torch.Generator(x.device).manual_seed(0)} if self._step_takes_generator else {}
        for t in sch.timesteps:
            x = sch.step(self.model_output(x, t), t, x, return_dict=False, **extra)[0]
        return self.decode(x)


class TransformerDiffusionOptions(DDPMOptions):
    """Options every transformer-diffusion adapter accepts: the ``ddpm`` ones (``steps``, ``t_edit``,
    ``edit_scale``, ``site``, ``dtype`` for the whole pipeline, ...) and the guidance weight."""

    site: Optional[SiteName] = Field(None, description="latent site (default: the middle block's image hidden states)")
    dtype: DtypeName = Field("float32", description="float32 | float16 | bfloat16: the whole pipeline's dtype")
    guidance_scale: NonNegativeFloat = Field(4.0, description="classifier-free guidance weight (<= 1: none)")


class TransformerDiffusionAdapter(DDPMAdapter):
    """Base of the transformer-diffusion adapters: loads a diffusers pipeline, samples with guidance, edits a block.

    Subclasses name their ``pipeline_classes`` and implement :meth:`conditioning` (the denoiser's
    keywords for one item: conditional and, under guidance, unconditional). Everything else
    (``traverse``, ``capture_h``, ``scales``, ``set_directions``, PCA / pull-back directions) is
    :class:`DDPMAdapter`'s.
    """

    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_part: ClassVar[str] = "transformer"  # the pipeline attribute holding the denoiser
    timestep_divisor: ClassVar[float] = 1.0
    scale_initial_noise: ClassVar[bool] = True
    upcast_vae: ClassVar[bool] = False  # the pipeline decodes a float16 force_upcast VAE in float32 (SDXL)
    capabilities: ClassVar[frozenset[str]] = frozenset({"directions", "sampling_loop", "inversion", "site_edits"})

    def __init__(self, pipeline: Any, *, guidance_scale: float = 4.0, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, model_id: str | None = None, **options: Any):
        from ..plugins import hook

        if isinstance(pipeline, (str, Path)):
            options |= {"device": device, "dtype": dtype}
            pipeline = self.resolve_pipeline(pipeline, options)
            model_id, device, dtype = options.pop("model_id", model_id), options.pop("device"), options.pop("dtype")
        options.pop("allow_pickle", None)  # used by the loading only
        for part in (self.denoiser_part, "vae", "scheduler"):
            if getattr(pipeline, part, None) is None:
                raise TypeError(f"{type(self).__name__} needs a diffusers pipeline ({' or '.join(self.pipeline_classes)}) "
                                f"with a {part}, or the directory of one; got {type(pipeline).__name__}")
        if not float(guidance_scale) >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        self.pipeline = pipeline
        self.guidance_scale = float(guidance_scale)
        self.copies = 2 if self.guidance_scale > 1.0 else 1
        target = parse_dtype(dtype)
        denoiser_module = getattr(pipeline, self.denoiser_part)
        if ((device is not None and torch.device(device) != denoiser_module.device)
                or (target is not None and target != denoiser_module.dtype)):  # loaded so already: no second cast
            pipeline.to(device=device, dtype=target)
        self.transformer = denoiser_module.eval()
        self.vae = pipeline.vae.eval()  # stays in its dtype: see TransformerSamplingLoop.decode for SDXL's upcast
        denoiser = DenoiserCall(self.transformer, self.timestep_divisor, *self.packing(pipeline)).eval()
        if options.get("site") is None:
            options["site"] = hook().latentexplainer_default_site(model=self.transformer)
        super().__init__(denoiser, self.make_scheduler(pipeline), model_id=model_id, **options)

    @classmethod
    def resolve_pipeline(cls, pipeline: Any, options: dict[str, Any]) -> Any:
        """``pipeline`` itself, or the pipeline loaded from a directory / hub id (``load_pipeline`` with the
        ``device``, ``dtype`` and ``allow_pickle`` in ``options``; ``model_id`` is set to the path)."""
        if not isinstance(pipeline, (str, Path)):
            return pipeline
        options.setdefault("model_id", str(pipeline))
        return load_pipeline(pipeline, cls.pipeline_classes, device=options.get("device") or "cpu",
                             dtype=options.get("dtype"), allow_pickle=bool(options.pop("allow_pickle", False)))

    # -- per family -----------------------------------------------------------------------------

    def conditioning(self) -> tuple[Conditioning, Conditioning | None]:
        """(conditional, unconditional or None) denoiser keywords for one item, on the model's device."""
        raise NotImplementedError(f"{type(self).__name__} must implement conditioning(); see DiTAdapter for an example")

    def shared_kwargs(self) -> dict[str, Any]:
        """Denoiser keywords without a batch dimension (the same for every item); none by default."""
        return {}

    def make_scheduler(self, pipeline: Any) -> Any:
        """The scheduler the loop steps with: the pipeline's own."""
        return pipeline.scheduler

    def packing(self, pipeline: Any) -> tuple[Any, Any]:
        """``(pack(x), unpack(out, shape))`` around each denoiser call; (None, None): latents go in as they are."""
        return None, None

    def _make_driver(self, steps: int) -> nn.Module:
        cond, uncond = self.conditioning()
        return TransformerSamplingLoop(self.unet, self.scheduler, steps, self.vae, cond, uncond if self.copies > 1 else None,
                                       self.guidance_scale, self.scale_initial_noise, self.shared_kwargs(), self.upcast_vae)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
                        steps: int = 50, t_edit: int | None = None, allow_pickle: bool = False,
                        **options: Any) -> "TransformerDiffusionAdapter":
        """Load a saved pipeline directory (or hub id) of one of ``pipeline_classes``; see :func:`load_pipeline`."""
        return cls(path_or_id, steps=steps, t_edit=t_edit, device=device, dtype=dtype, allow_pickle=allow_pickle, **options)

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the pipeline makes (and :meth:`invert` takes): the latent side x the VAE's scale."""
        config = self.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        _, h, w = self.image_shape
        return int(config.in_channels), h * factor, w * factor

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.pop("unet", None)
        return info | {"pipeline": type(self.pipeline).__name__, "denoiser": type(self.transformer).__name__,
                       "guidance_scale": self.guidance_scale}


class DiTOptions(TransformerDiffusionOptions):
    """Options of the ``dit`` adapter."""

    class_label: int | str = Field(0, description="the class every image shows: an index, or a name from the pipeline's id2label")


class DiTAdapter(TransformerDiffusionAdapter):
    """Explain directions at a block of a class-conditional DiT (``DiTPipeline``, Peebles & Xie 2023).

    Args:
        pipeline: a ``DiTPipeline`` (or use :meth:`from_pretrained` with its directory).
        class_label: the class of every image: an index, or a name from the pipeline's ``id2label``
            (``"golden retriever"``; names are matched case-insensitively).
        guidance_scale: g of classifier-free guidance against the null class (the pipeline's
            default, 4.0; <= 1 turns guidance off).
        Everything else as :class:`DDPMAdapter` (``steps``, ``t_edit``, ``scale``, ``site``, ...).

    As in ``DiTPipeline``, z_T is not multiplied by the scheduler's ``init_noise_sigma``.
    """

    name = "dit"
    pipeline_classes = ("DiTPipeline",)
    scale_initial_noise = False
    Options = DiTOptions

    def __init__(self, pipeline: Any, *, class_label: int | str = 0, guidance_scale: float = 4.0, **options: Any):
        pipeline = self.resolve_pipeline(pipeline, options)
        config = getattr(getattr(pipeline, "transformer", None), "config", None)
        self.n_classes = getattr(config, "num_embeds_ada_norm", None)
        if not isinstance(self.n_classes, int):
            raise TypeError(f"DiTAdapter needs a DiTPipeline whose transformer is class-conditional (num_embeds_ada_norm), "
                            f"got {type(pipeline).__name__}")
        self.class_label = self.resolve_label(class_label, getattr(pipeline, "labels", None) or {}, self.n_classes)
        super().__init__(pipeline, guidance_scale=guidance_scale, **options)

    @staticmethod
    def resolve_label(label: int | str, labels: dict[str, int], n_classes: int) -> int:
        """A class index from an index or a name of ``labels`` (name -> index, the pipeline's ``labels``)."""
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label)
        if isinstance(label, str):
            by_lower = {k.lower(): v for k, v in labels.items()}
            if label.strip().lower() in by_lower:
                return by_lower[label.strip().lower()]
            if not labels:
                raise ValueError(f"class_label {label!r}: this pipeline has no id2label names (model_index.json); "
                                 f"give a class index in 0..{n_classes - 1}")
            close = difflib.get_close_matches(label.lower(), list(by_lower), n=5, cutoff=0.5)
            hint = f"closest names: {', '.join(close)}" if close else f"e.g. {', '.join(sorted(labels)[:5])}"
            raise ValueError(f"class_label {label!r} is not a class name of this pipeline ({len(labels)} names; {hint}); "
                             f"or give a class index in 0..{n_classes - 1}")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n_classes:
            raise ValueError(f"class_label must be a class index in 0..{n_classes - 1} or a class name, got {label!r}")
        return label

    def conditioning(self) -> tuple[Conditioning, Conditioning]:
        device = self.transformer.device
        # the null class of classifier-free guidance is the extra row n_classes of the label table
        return ({"class_labels": torch.tensor([self.class_label], device=device)},
                {"class_labels": torch.tensor([self.n_classes], device=device)})

    def describe(self) -> dict[str, Any]:
        names = [k for k, v in (getattr(self.pipeline, "labels", None) or {}).items() if v == self.class_label]
        return super().describe() | {"class_label": self.class_label, "class_names": names}


class PixArtOptions(TransformerDiffusionOptions):
    """Options of the ``pixart`` adapter."""

    prompt: str = Field("a photograph", min_length=1, description="what every image shows")
    negative_prompt: str = Field("", description="what guidance steers away from")
    guidance_scale: NonNegativeFloat = Field(4.5, description="classifier-free guidance weight (<= 1: none)")
    steps: PositiveInt = Field(20, description="denoising steps per image")
    max_sequence_length: Optional[PositiveInt] = Field(None, description="T5 tokens per prompt (default: the pipeline's, 120 alpha / 300 sigma)")
    resolution: Optional[PositiveInt] = Field(None, description="image side in pixels (default: the model's, sample_size x the VAE's scale factor)")


class PixArtAdapter(TransformerDiffusionAdapter):
    """Explain directions at a block of a PixArt transformer (``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``).

    Args:
        pipeline: a PixArt pipeline (or use :meth:`from_pretrained` with its directory).
        prompt / negative_prompt: encoded once by the pipeline's own ``encode_prompt`` (T5), without
            caption cleaning (``clean_caption=False``: it needs bs4 and ftfy).
        guidance_scale: the pipeline's default 4.5 (<= 1: no guidance).
        max_sequence_length: T5 tokens (default: the pipeline's).
        resolution: the side of the square images in pixels (default: the model's, ``sample_size``
            x the VAE's scale factor: 1024 for PixArt-alpha 1024, 512 / 256 for the others).
        Everything else as :class:`DDPMAdapter`.

    PixArt-alpha at 1024 px (``sample_size`` 128) is conditioned on the image size: as
    ``PixArtAlphaPipeline`` does, the adapter passes ``resolution`` = (side, side) and
    ``aspect_ratio`` = 1.0 as added conditions (the transformer uses them when its
    ``use_additional_conditions`` is on, the default for ``sample_size`` 128). The images are made at
    exactly ``resolution``: the pipeline's ``use_resolution_binning`` (generate at the nearest trained
    size, then resize) is not applied; 1024 x 1024 is a trained size, so the default matches the
    pipeline's default call.
    """

    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    Options = PixArtOptions

    def __init__(self, pipeline: Any, *, prompt: str = "a photograph", negative_prompt: str = "", guidance_scale: float = 4.5,
                 max_sequence_length: int | None = None, steps: int = 20, resolution: int | None = None, **options: Any):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or max_sequence_length < 1):
            raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}")
        if resolution is not None and (not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1):
            raise ValueError(f"resolution must be an image side in pixels (an integer >= 1), got {resolution!r}")
        pipeline = self.resolve_pipeline(pipeline, options)
        for part in ("transformer", "text_encoder", "tokenizer"):
            if getattr(pipeline, part, None) is None:
                raise TypeError(f"PixArtAdapter needs the pipeline's {part} (a PixArt pipeline or its directory)")
        scale = int(getattr(pipeline, "vae_scale_factor", 8))
        patch = int(pipeline.transformer.config.patch_size)
        side = int(resolution or int(pipeline.transformer.config.sample_size) * scale)
        if side % (scale * patch):
            raise ValueError(f"resolution must be a multiple of {scale * patch} pixels (VAE scale factor {scale} x patch size "
                             f"{patch}), got {side}")
        self.resolution, self.latent_side = side, side // scale
        self.prompt, self.negative_prompt, self.max_sequence_length = prompt, negative_prompt, max_sequence_length
        super().__init__(pipeline, guidance_scale=guidance_scale, steps=steps, **options)

    @torch.no_grad()
    def conditioning(self) -> tuple[Conditioning, Conditioning | None]:
        pipe, device, dtype = self.pipeline, self.transformer.device, self.transformer.dtype
        extra = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            self.prompt, self.copies > 1, negative_prompt=self.negative_prompt, num_images_per_prompt=1, device=device,
            clean_caption=False, **extra)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if self.transformer.config.sample_size == 128:  # PixArt-alpha 1024px: the pipeline's size conditions
            side = self.resolution
            added = {"resolution": torch.tensor([[side, side]], dtype=embeds.dtype, device=device).to(dtype),
                     "aspect_ratio": torch.tensor([[1.0]], dtype=embeds.dtype, device=device).to(dtype)}
        cond = {"encoder_hidden_states": embeds.to(dtype), "encoder_attention_mask": mask, "added_cond_kwargs": added}
        if self.copies == 1:
            return cond, None
        return cond, {"encoder_hidden_states": neg_embeds.to(dtype), "encoder_attention_mask": neg_mask, "added_cond_kwargs": added}

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
                        steps: int = 20, t_edit: int | None = None, allow_pickle: bool = False,
                        **options: Any) -> "PixArtAdapter":
        return super().from_pretrained(path_or_id, device=device, dtype=dtype, steps=steps, t_edit=t_edit,
                                       allow_pickle=allow_pickle, **options)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return int(self.transformer.config.in_channels), self.latent_side, self.latent_side

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                                     "resolution": self.resolution}
