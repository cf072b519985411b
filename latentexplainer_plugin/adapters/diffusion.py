"""DDPM/DDIM adapter: h-space traversals of an unconditional diffusion UNet, through nnsight.

1. Bases are initial noises x_T ~ N(0, I), shape (n, C, H, W), drawn from a seed, or obtained from
   the user's own images by deterministic inversion of the sampler (:meth:`DDPMAdapter.invert`).
2. :class:`SamplingLoop` is a small ``nn.Module`` whose ``forward(x_T)`` runs the whole sampling
   loop, so one nnsight trace with ``calls=steps`` covers every denoising step. The UNet's children
   are registered on it, so site paths are the UNet's own: ``mid_block`` (h-space), not
   ``unet.mid_block``.
3. The h-space edit (Kwon et al. 2023, "Diffusion models already have a semantic latent space"):
   h_t <- h_t + alpha * s_k * v_k at ``mid_block.output`` on every step whose timestep t >= t_edit
   (from T down to t_edit), with v_k a unit direction and s_k its scale (by default the standard
   deviation of <h, v_k> over a calibration set, so alpha counts standard deviations).
4. The batch is (direction, base, strength): every strength of every base is sampled in the same
   run (one trace), never in a Python loop over strengths.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence, Union

import torch
from pydantic import AfterValidator
from torch import nn

from pydantic import Field

from ..hooks import capture, check_finite, edit_items, probe_shape, repeat_edit, resolve_module, run_with_edit
from ..options import ComponentOptions, DtypeName, NonNegativeInt, PositiveInt, SiteName, validate_options
from ..plugins import hook
from ..safe_load import LoadError
from ..types import Edit, Site, Traversal
from ..directions.find import find_directions, resolve_direction_spec  # noqa: F401 (re-exported)
from ..directions.finders import labelled_images  # noqa: F401 (re-exported)
from .base import Adapter, check_strengths

CALIBRATION_SEED = 1_000_003  # seed of the noises that calibrate the edit scale (independent of the bases)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float16"`` -> torch.float16; torch dtypes pass through; None stays None."""
    from ..devices import dtype_name

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, dtype_name(dtype))
    except ValueError as exc:
        raise ValueError(f"dtype {exc}") from None


class SamplingLoop(nn.Module):
    """``forward(x_T)`` runs ``steps`` denoising steps of ``unet`` with ``scheduler`` and returns x_0.

    The UNet's children are registered on this module (the UNet itself is not a child), so a site
    is named by the UNet's own module path, e.g. ``mid_block``. The k-th call of a UNet module
    during ``forward`` belongs to the k-th timestep of ``timesteps``.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, steps: int):
        super().__init__()
        for name, child in unet.named_children():
            self.add_module(name, child)
        self._unet = (unet,)  # a tuple keeps it out of the module tree
        self.scheduler = scheduler
        self.steps = steps
        params = inspect.signature(scheduler.step).parameters
        self._step_takes_generator = "generator" in params

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    def timesteps(self) -> list[int]:
        """The sampling timesteps, first (largest) to last; one UNet call each."""
        self.scheduler.set_timesteps(self.steps)
        return [int(t) for t in self.scheduler.timesteps]

    def unet_kwargs(self, n: int) -> dict[str, Any]:
        """Extra UNet arguments for a batch of ``n`` (conditioning, in subclasses)."""
        return {}

    def model_output(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """What the scheduler steps with: epsilon_theta(x_t, t) (guided, in subclasses)."""
        return self.unet(self.scheduler.scale_model_input(x, t), t, return_dict=False, **self.unet_kwargs(len(x)))[0]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final sample -> image in [-1, 1] (identity for pixel-space models)."""
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> clean sample x_0, the inverse of :meth:`decode` (identity for pixel-space models)."""
        return images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sch = self.scheduler
        sch.set_timesteps(self.steps, device=x.device)  # also resets multistep schedulers' state
        x = x * sch.init_noise_sigma
        extra = {"generator": torch.Generator(x.device).manual_seed(0)} if self._step_takes_generator else {}
        for t in sch.timesteps:
            # 1. epsilon_theta(x_t, t); 2. x_{t-1} from the scheduler's update (DDIM: Song et al. eq. 12)
            x = sch.step(self.model_output(x, t), t, x, return_dict=False, **extra)[0]
        return self.decode(x)


def move(module: nn.Module, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    """``module.to(device, dtype)``, passing only what changes: diffusers models warn on any
    ``.to(dtype=...)`` call (even to the dtype they have)."""
    current = next(module.parameters(), None)
    moves: dict[str, Any] = {"device": device} if device is not None else {}
    if dtype is not None and (current is None or current.dtype != dtype):
        moves["dtype"] = dtype
    return module.to(**moves) if moves else module


def _is_local(path: str | Path) -> bool:
    p = Path(path)
    return p.exists() or str(path).startswith((".", "/", "~")) or p.is_absolute()


def load_ddpm(path_or_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
              allow_pickle: bool = False):
    """``(unet, scheduler)`` from a pipeline directory or hub id (``unet/`` + ``scheduler/``) or a bare UNet.

    The scheduler is always a :class:`diffusers.DDIMScheduler` built from the saved scheduler
    config (a DDPM config works too); without one, DDIM's default config is used. Weights saved
    only as pickle (``.bin``) are refused unless ``allow_pickle`` (then read with weights_only=True);
    a local config whose sizes would need absurd memory is refused before anything is built.
    """
    from .loading import SCHEDULER_LIMITS, UNET_LIMITS, check_config_sizes, check_pickle_policy, use_safetensors
    from diffusers import DDIMScheduler, UNet2DModel

    dtype = parse_dtype(dtype) or torch.float32
    source = str(path_or_id)
    if _is_local(source):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise LoadError(f"model path {root} does not exist (a DDPM model is a pipeline directory with unet/ and scheduler/, or a UNet directory)")
        if (root / "unet" / "config.json").is_file():
            unet_sub = "unet"
        elif (root / "config.json").is_file():
            unet_sub = None
        else:
            raise LoadError(f"{root} holds neither unet/config.json (pipeline layout) nor config.json (a UNet directory)")
        _check_unet_class(root / (unet_sub or "") / "config.json")
        sched_sub = "scheduler" if (root / "scheduler" / "scheduler_config.json").is_file() else (
            "" if (root / "scheduler_config.json").is_file() else False)
        from ..safe_load import read_config

        unet_config = root / (unet_sub or "") / "config.json"
        check_config_sizes(read_config(unet_config), UNET_LIMITS, unet_config)
        if sched_sub is not False:
            sched_config = root / (sched_sub or "") / "scheduler_config.json"
            check_config_sizes(read_config(sched_config), SCHEDULER_LIMITS, sched_config)
        check_unet_parameters(UNet2DModel, unet_config)
        check_pickle_policy(root / (unet_sub or ""), allow_pickle, "UNet")
    else:
        from ..hub import hub_problem

        problem = hub_problem(source, ("unet/config.json", "config.json"))
        if problem is not None:  # seconds, not the minutes of diffusers' retries
            raise LoadError(f"model={source!r} {problem}; give the local directory of a pipeline (unet/ and scheduler/) "
                            "or of a UNet saved with save_pretrained(dir)")
        root, unet_sub, sched_sub = source, "unet", "scheduler"
    low_memory = importlib.util.find_spec("accelerate") is not None  # else diffusers warns on every load
    try:
        unet = _from_pretrained(UNet2DModel, str(root), unet_sub, torch_dtype=dtype, low_cpu_mem_usage=low_memory,
                                use_safetensors=use_safetensors(allow_pickle, root / (unet_sub or "") if _is_local(source) else None))
    except (OSError, ValueError) as exc:
        raise LoadError(f"could not load a UNet2DModel from {source}: {exc}") from exc
    if sched_sub is False:
        scheduler = DDIMScheduler(num_train_timesteps=1000)
    else:
        try:
            scheduler = _from_pretrained(DDIMScheduler, str(root), sched_sub)
        except (OSError, ValueError):
            scheduler = DDIMScheduler(num_train_timesteps=1000)
    return unet.to(device).eval(), scheduler


def _from_pretrained(cls: Any, root: str, subfolder: str | None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with ``subfolder``; for hub ids, fall back to the repository root."""
    try:
        return cls.from_pretrained(root, subfolder=subfolder or None, **kwargs)
    except (OSError, ValueError):
        if not subfolder or _is_local(root):
            raise
        return cls.from_pretrained(root, **kwargs)


def check_unet_parameters(cls: Any, config_path: Path) -> None:
    """Count the parameters of the model ``config_path`` describes, on the meta device (no memory)."""
    from ..safe_load import read_config
    from .loading import check_parameter_count

    config = {k: v for k, v in read_config(config_path).items() if not k.startswith("_")}
    try:
        check_parameter_count(lambda: cls.from_config(config), config_path)
    except LoadError:
        raise
    except Exception as exc:  # diffusers raises many types for configs it cannot build
        raise LoadError(f"{config_path}: not a valid {cls.__name__} config ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None


def _check_unet_class(config_path: Path) -> None:
    from ..safe_load import read_config

    kind = read_config(config_path).get("_class_name")
    if kind not in (None, "UNet2DModel"):
        hint = " (a text-conditioned Stable Diffusion UNet)" if kind == "UNet2DConditionModel" else ""
        raise LoadError(f"{config_path} describes a {kind}{hint}; the ddpm adapter needs an unconditional UNet2DModel")


def _edit_scale(value: Any) -> Any:
    if value == "auto":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be auto or a positive number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"must be auto or a positive number, got {value!r}")
    return number


class DDPMOptions(ComponentOptions):
    """Options of the ``ddpm`` adapter (and, with more, of every sampling-loop adapter)."""

    steps: PositiveInt = Field(50, description="denoising steps per image")
    t_edit: Optional[NonNegativeInt] = Field(None, description="edit h on every step with timestep t >= T (default: half the training timesteps)")
    edit_scale: Annotated[Union[str, float], AfterValidator(_edit_scale)] = Field(
        "auto", description="h <- h + strength * scale * v; auto: scale = std of <h, v> over 16 samples")
    site: Optional[SiteName] = Field(None, description="latent site (default: mid_block.output, h-space)")
    dtype: DtypeName = Field("float32", description="float32 | float16 | bfloat16: the UNet's dtype")
    max_batch: PositiveInt = Field(64, description="images sampled together in one trace")
    device: str = Field("cpu", description="torch device (the run's --device)")
    allow_pickle: bool = Field(False, description="accept .bin (pickle) weights, read with weights_only=True")


class DDPMAdapter(Adapter):
    """Explain directions in the h-space of an unconditional diffusion UNet (``UNet2DModel``).

    Args:
        model: a ``UNet2DModel``, a pipeline with ``.unet`` and ``.scheduler``, or a path / hub id.
        scheduler: any diffusers scheduler with ``set_timesteps``/``step`` (default: DDIM, eta=0).
        directions: a :class:`~latentexplainer_plugin.directions.Directions` (K, *h_shape) or tensor.
        steps: denoising steps per sample.
        t_edit: edit every step whose timestep t >= t_edit (default: half the training timesteps).
        site: where h lives (default: the architecture's default site, ``mid_block.output``).
        scale: ``"auto"`` (alpha in standard deviations of <h, v> over ``calibration_samples``
            samples in the edit window) or a number (h <- h + alpha * scale * v).
        max_batch: images sampled together in one trace.
    """

    name = "ddpm"
    default_bias = "combination"  # one row per base: there is no other latent to clamp in h-space
    max_rows = 1
    Options = DDPMOptions
    capabilities = frozenset({"directions", "sampling_loop", "inversion", "site_edits"})
    default_direction_finder = "pca"
    copies = 1  # how many times each image is in the UNet's batch (classifier-free guidance: 2)

    def __init__(self, model: Any, scheduler: Any = None, *, directions: Any = None, steps: int = 50,
                 t_edit: int | None = None, site: Site | str | None = None, scale: float | str = "auto",
                 max_batch: int = 64, calibration_samples: int = 16, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, model_id: str | None = None, allow_pickle: bool = False,
                 edit_scale: float | str | None = None):
        if edit_scale is not None:  # the option's name on the command line (-o edit_scale=, --edit-scale)
            scale = edit_scale
        if isinstance(model, (str, Path)):
            model_id = model_id or str(model)
            model, loaded = load_ddpm(model, device=device or "cpu", dtype=dtype, allow_pickle=allow_pickle)
            scheduler = scheduler or loaded
        elif hasattr(model, "unet") and hasattr(model, "scheduler") and not isinstance(model, nn.Module):
            scheduler = scheduler or model.scheduler  # a diffusers pipeline object
            model = model.unet
        if not isinstance(model, nn.Module):
            raise TypeError(f"DDPMAdapter needs a diffusers UNet2DModel (or a path to one), got {type(model).__name__}")
        if scheduler is None:
            from diffusers import DDIMScheduler

            scheduler = DDIMScheduler(num_train_timesteps=1000)
        for needed in ("set_timesteps", "step"):
            if not callable(getattr(scheduler, needed, None)):
                raise TypeError(f"scheduler {type(scheduler).__name__} has no {needed}(); pass a diffusers scheduler")
        # the declared options check themselves (the same checks the command line runs): written once
        scale = validate_options(DDPMOptions, {"steps": steps, "max_batch": max_batch, "edit_scale": scale, "t_edit": t_edit},
                                 f"the {self.name} adapter")["edit_scale"]
        if calibration_samples < 2:
            raise ValueError(f"calibration_samples must be >= 2 (a standard deviation needs two samples), got {calibration_samples}")
        self.dtype = parse_dtype(dtype)
        model = move(model, device, self.dtype)
        self.unet = model.eval()
        self.device = next(self.unet.parameters()).device
        self.dtype = next(self.unet.parameters()).dtype
        self.scheduler = scheduler
        self.driver = self._make_driver(steps).eval()
        if isinstance(site, str):
            site = Site.parse(site)
        self.site = site or hook().latentexplainer_default_site(model=self.unet)
        if self.site is None:
            raise ValueError(f"no plugin knows the default latent site of a {type(self.unet).__name__}; pass site= "
                             "(e.g. mid_block.output)")
        resolve_module(self.driver, self.site.path)
        self.model_id = model_id or type(self.unet).__name__
        self.max_batch = max_batch
        self.calibration_samples = calibration_samples
        self.scale = scale
        self.timesteps = self.driver.timesteps()
        if any(a < b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"{type(scheduler).__name__} gives timesteps that do not decrease: {self.timesteps}")
        self.n_calls = len(self.timesteps)
        n_train = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000))
        self.t_edit = n_train // 2 if t_edit is None else int(t_edit)
        if not 0 <= self.t_edit < n_train:
            raise ValueError(f"t_edit must be a timestep in 0..{n_train - 1}, got {t_edit}")
        window = sum(t >= self.t_edit for t in self.timesteps)
        if window == 0:
            raise ValueError(
                f"t_edit={self.t_edit} is above every sampling timestep (the first is {self.timesteps[0]}): "
                f"no step would be edited; use t_edit <= {self.timesteps[0]}"
            )
        self.edit_calls = slice(0, window)
        self._h_shapes: dict[tuple[Site, tuple[int, ...]], tuple[int, ...]] = {}
        self.directions: torch.Tensor | None = None
        self.provenance: dict[str, Any] = {}
        self._scales: torch.Tensor | None = None
        if self.site.kind == "update":  # a block that resamples has no update: refuse it now, not after sampling
            self.h_shape()
        if directions is not None:
            self.set_directions(directions)

    def _make_driver(self, steps: int) -> nn.Module:
        """The module whose forward(x_T) samples images; subclasses add guidance or a decoder."""
        return SamplingLoop(self.unet, self.scheduler, steps)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "float32",
                        steps: int = 50, t_edit: int | None = None, allow_pickle: bool = False,
                        **options: Any) -> "DDPMAdapter":
        """Load ``UNet2DModel`` + ``DDIMScheduler`` (pipeline layout, hub id or bare UNet directory);
        ``allow_pickle`` accepts ``.bin`` weights (see :func:`load_ddpm`)."""
        unet, scheduler = load_ddpm(path_or_id, device=device, dtype=dtype, allow_pickle=allow_pickle)
        return cls(unet, scheduler, steps=steps, t_edit=t_edit, model_id=str(path_or_id), **options)

    # -- shapes, bases, directions -------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        config = getattr(self.unet, "config", None)
        size = getattr(config, "sample_size", None)
        channels = getattr(config, "in_channels", None)
        if size is None or channels is None:
            raise ValueError(f"cannot tell the image size of {type(self.unet).__name__}: pass bases explicitly")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(channels), int(h), int(w)

    def h_shape(self, image_shape: tuple[int, ...] | None = None, site: Site | None = None) -> tuple[int, ...]:
        """Per-item shape of the activation at ``site`` (default: the latent site) for images of
        ``image_shape`` (probed once per site and shape)."""
        image_shape = tuple(image_shape or self.image_shape)
        key = (site or self.site, image_shape)
        if key not in self._h_shapes:
            x = torch.zeros(1, *image_shape, device=self.device, dtype=self.dtype)
            self._h_shapes[key] = tuple(probe_shape(self.driver, key[0], x)[1:])
        return self._h_shapes[key]

    def set_directions(self, directions: Any) -> None:
        """Directions to explain: a Directions object or a tensor (K, *h_shape); each is normalized."""
        self.directions, self.provenance = self._unit_directions(directions)
        self._scales = None

    def _unit_directions(self, directions: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        provenance: dict[str, Any] = {}
        if hasattr(directions, "vectors"):
            provenance = dict(getattr(directions, "provenance", {}) or {})
            directions = directions.vectors
        vectors = torch.as_tensor(directions).detach().float().cpu()
        shape = self.h_shape()
        if vectors.shape[1:] != torch.Size(shape):
            if tuple(vectors.shape) == shape:
                vectors = vectors[None]
            else:
                raise ValueError(
                    f"directions have shape {tuple(vectors.shape)}, but h at {self.site} has shape {shape} per image: "
                    f"give (K, {', '.join(map(str, shape))})"
                )
        check_finite(vectors, "directions")
        norms = vectors.flatten(1).norm(dim=1)
        if (norms < 1e-8).any():
            raise ValueError(f"direction(s) {torch.nonzero(norms < 1e-8).flatten().tolist()} have zero norm")
        return vectors / norms.view(-1, *([1] * len(shape))), provenance

    @property
    def n_latents(self) -> int:
        return 0 if self.directions is None else len(self.directions)

    def latent_id(self, index: int) -> str:
        return f"dir{index}"

    def check_index(self, index: int) -> int:
        if self.directions is None:
            raise IndexError("the ddpm adapter has no directions yet: call set_directions(...) or pass directions=")
        return super().check_index(index)

    def sample_bases(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` initial noises x_T ~ N(0, I), (n, C, H, W), reproducible from ``seed``."""
        if n < 1:
            raise ValueError(f"need at least 1 base noise, got {n}")
        return torch.randn(n, *self.image_shape, generator=torch.Generator().manual_seed(seed))

    def _check_bases(self, bases: torch.Tensor) -> torch.Tensor:
        bases = torch.as_tensor(bases, dtype=torch.float32)
        if bases.ndim == 3:
            bases = bases[None]
        if bases.ndim != 4:
            raise ValueError(f"base noises must have shape (n, C, H, W), got {tuple(bases.shape)}")
        check_finite(bases, "base noises")
        return bases

    # -- sampling ------------------------------------------------------------------------------

    def output_to_images(self, x: torch.Tensor) -> torch.Tensor:
        """The driver's output (images in [-1, 1]) as images in [0, 1] on the CPU."""
        return ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def sample(self, bases: torch.Tensor) -> torch.Tensor:
        """Plain sampling from x_T (no edit, no nnsight): images (n, C, H, W) in [0, 1]."""
        bases = self._check_bases(bases)
        out = [self.driver(chunk.to(self.device, self.dtype)) for chunk in bases.split(self.max_batch)]
        return self.output_to_images(torch.cat(out))

    @torch.no_grad()
    def sample_edited(self, bases: torch.Tensor, strengths: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """Sample from ``bases`` (B, C, H, W) with h <- h + strengths[b] * direction inside the edit window.

        ``direction`` is (*h_shape) for all items or (B, *h_shape) per item, already scaled.
        """
        direction = direction.to(self.device, self.dtype)
        return self.render_edited(bases, Edit("add", torch.as_tensor(strengths, dtype=torch.float32), direction=direction))

    def render_edited(self, bases: torch.Tensor, edit: Edit, site: Site | None = None) -> torch.Tensor:
        """Sample from noises ``bases`` (B, C, H, W) with ``edit`` (any registered rule, one strength
        per item) applied at ``site`` (default: the latent site) on every step of the edit window;
        images (B, C, H, W) in [0, 1].

        One nnsight trace per chunk of ``max_batch`` items covers every step. Under guidance the
        denoiser sees each item ``copies`` times and every copy gets the item's edit. Differentiable in
        the edit's tensors when gradients are enabled (ranking); traversals run it under no_grad.
        """
        site = site or self.site
        bases = self._check_bases(bases)
        item_shape = self.h_shape(tuple(bases.shape[1:]), site)
        out = []
        for start in range(0, len(bases), self.max_batch):
            x = bases[start:start + self.max_batch].to(self.device, self.dtype)
            part = edit_items(edit, slice(start, start + self.max_batch), len(item_shape))
            part = replace(repeat_edit(part, self.copies, len(item_shape)), calls=self.edit_calls)
            expected = (self.copies * len(x), *item_shape)
            out.append(run_with_edit(self.driver, site, part, x, calls=self.n_calls, expected_shape=expected))
        return self.output_to_images(torch.cat(out))

    def capture_h(self, bases: torch.Tensor, window_only: bool = True, site: Site | None = None) -> torch.Tensor:
        """h at ``site`` (default: the latent site) for every step (in the edit window),
        (n, steps, *h_shape), via ``hooks.capture``.

        With guidance (``copies`` > 1) the conditional (last) copy of each image is kept.
        """
        bases = self._check_bases(bases)
        chunks = []
        for chunk in bases.split(self.max_batch):
            with torch.no_grad():
                per_call = capture(self.driver, site or self.site, chunk.to(self.device, self.dtype), calls=self.n_calls)
            if window_only:
                per_call = per_call[self.edit_calls]
            per_call = [h[-len(chunk):] for h in per_call]  # the last copy: the conditional half under guidance
            chunks.append(torch.stack([h.float().cpu() for h in per_call], dim=1))
        return torch.cat(chunks)

    def site_activations(self, bases: torch.Tensor, site: Site | None = None) -> torch.Tensor:
        """The activation at ``site`` on the steps of the edit window, where edits apply:
        (n, window steps, *item shape) (:meth:`capture_h`)."""
        return self.capture_h(bases, window_only=True, site=site)

    def scales(self, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Edit scale s_k of each direction (the adapter's, cached, or of unit ``vectors``).

        A number when ``scale`` is one; with ``scale="auto"`` the std of <h, v_k> over
        ``calibration_samples`` noises at each step of the edit window, averaged over the steps,
        so alpha = 1 moves h by one standard deviation along v_k.
        """
        if vectors is None:
            if self.directions is None:
                raise RuntimeError("the ddpm adapter has no directions yet: call set_directions(...)")
            if self._scales is None:
                self._scales = self.scales(self.directions)
            return self._scales
        if self.scale != "auto":
            return torch.full((len(vectors),), float(self.scale))
        h = self.capture_h(self.sample_bases(self.calibration_samples, CALIBRATION_SEED))
        proj = torch.einsum("nsd,kd->nsk", h.flatten(2).double(), vectors.flatten(1).double())
        return proj.std(dim=0).mean(dim=0).float().clamp_min(1e-6)

    def traverse(self, indices: Sequence[int], bases: torch.Tensor, strengths: Sequence[float] | torch.Tensor,
                 rows: int = 1, *, directions: torch.Tensor | None = None, **_: Any) -> list[Traversal]:
        """One Traversal per direction: images (n_bases, 1, n_steps, C, H, W) in [0, 1].

        Every (direction, base, strength) item is sampled in the same trace (chunks of
        ``max_batch``). ``rows`` must be 1: h-space has no other latent to clamp for the
        disentanglement comparison, so use the ``combination`` (or ``conditional``) bias.
        """
        strengths = check_strengths(strengths)
        if rows != 1:
            raise ValueError(
                f"the ddpm adapter draws one row per base, but the bias asks for {rows} rows (the disentanglement "
                f"comparison clamps another latent, which h-space directions do not have); use the combination bias "
                f"(bias='combination') or the conditional one"
            )
        if directions is not None:  # these directions only, the adapter's own stay
            units = self._unit_directions(directions)[0]
            indices, scales = list(range(len(units))), self.scales(units)
        else:
            indices = [self.check_index(i) for i in indices]
            units, scales = self.directions, self.scales()
        if not indices:
            raise ValueError("nothing to traverse: indices is empty")
        bases = self._check_bases(bases)
        k, n, s = len(indices), len(bases), len(strengths)
        x = bases[None, :, None].expand(k, n, s, *bases.shape[1:]).reshape(-1, *bases.shape[1:])
        alpha = strengths.repeat(k * n)
        vectors = units[indices] * scales[indices].view(-1, *([1] * (units.ndim - 1)))
        direction = vectors[0] if k == 1 else vectors.repeat_interleave(n * s, dim=0)
        images = self.sample_edited(x, alpha, direction)
        images = images.view(k, n, 1, s, *images.shape[1:])
        meta = {"site": str(self.site), "t_edit": self.t_edit, "steps": len(self.timesteps),
                "edited_timesteps": self.timesteps[self.edit_calls]}
        return [
            Traversal(latent_id=self.latent_id(i), images=images[li], strengths=strengths, rule="add", index=i,
                      direction=units[i], base_latents=bases, row_labels=[""],
                      meta=meta | {"scale": float(scales[i])})
            for li, i in enumerate(indices)
        ]

    # -- inversion -------------------------------------------------------------------------------

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of the images :meth:`invert` takes (pixel-space models: ``image_shape``)."""
        return self.image_shape

    @torch.no_grad()
    def invert(self, images: torch.Tensor, steps: int | None = None, refine: int = 0) -> torch.Tensor:
        """Deterministic inversion of images (n, C, H, W) in [0, 1] to the noises that sampling starts from.

        The images go through ``driver.encode`` (pixel models: as they are; latent models: the VAE
        encoder), then :meth:`invert_samples` runs the sampler's update backwards. ``steps``
        defaults to the adapter's; ``refine`` > 0 adds fixed-point iterations per step.
        """
        if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
            raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self.inversion_kind()  # refuse an unsupported scheduler before any work
        images = torch.as_tensor(images, dtype=torch.float32)
        shape = self.pixel_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
            raise ValueError(f"images must have shape (n, {', '.join(map(str, shape))}) in [0, 1], got {tuple(images.shape)}: "
                             f"invert images of the size the model generates ({shape[1]}x{shape[2]}, {shape[0]} channels)")
        check_finite(images, "images")
        out = []
        for chunk in images.split(self.max_batch):
            x0 = self.driver.encode(chunk.to(self.device) * 2.0 - 1.0)
            out.append(self.invert_samples(x0, steps=steps, refine=refine))
        return torch.cat(out)

    def inversion_kind(self) -> str:
        """How :meth:`invert_samples` runs this adapter's scheduler backwards; ValueError when it cannot.

        ``"ddim"``: DDIMScheduler, its update exactly (eta = 0, x_0 clipping mirrored); ``"sigma"``:
        EulerDiscreteScheduler (epsilon) and FlowMatchEulerDiscreteScheduler, whose deterministic step
        is x <- x + (sigma_next - sigma) * model_output; ``"vp"``: other schedulers with
        ``alphas_cumprod`` and epsilon prediction (DPM-Solver, PNDM, ...), inverted with the first-order
        DDIM update along their timesteps, an approximation of their higher-order sampler.
        """
        sch = self.scheduler
        kind = type(sch).__name__
        config = getattr(sch, "config", {})
        prediction = config.get("prediction_type", "epsilon") if hasattr(config, "get") else "epsilon"
        if kind == "FlowMatchEulerDiscreteScheduler":
            if config.get("stochastic_sampling", False):
                raise ValueError("invert() needs deterministic sampling; this FlowMatchEulerDiscreteScheduler has stochastic_sampling=True")
            return "sigma"
        if prediction != "epsilon":
            raise ValueError(f"invert() supports epsilon-prediction models (and flow matching), this scheduler has "
                             f"prediction_type={prediction!r}")
        if kind == "DDIMScheduler":
            return "ddim"
        if kind == "EulerDiscreteScheduler":
            return "sigma"
        if getattr(sch, "alphas_cumprod", None) is not None and float(getattr(sch, "init_noise_sigma", 1.0)) == 1.0:
            return "vp"  # samples x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, as DDIM's
        raise ValueError(f"invert() runs DDIM, Euler or flow-matching Euler sampling backwards (or DDIM along the timesteps "
                         f"of a variance-preserving scheduler such as DPM-Solver); {kind} is none of these: give the "
                         "pipeline a DDIMScheduler or an EulerDiscreteScheduler")

    @torch.no_grad()
    def invert_samples(self, x: torch.Tensor, steps: int | None = None, refine: int = 0) -> torch.Tensor:
        """Clean samples x_0 (n, *image_shape) -> the noises that sampling (:meth:`sample`) starts from.

        Runs the sampler's update backwards, t ascending, with the model as the adapter samples it
        (guidance included: the result is the inverse of the guided ODE that sampling integrates).
        Each step needs the model output at the unknown noisier sample; the classic inversion (Song
        et al. 2021, Sec. 4.3) takes it at the less noisy one instead. ``refine`` > 0 solves the step
        by that many fixed-point iterations (one extra model call each).
        """
        kind = self.inversion_kind()
        sch = self.scheduler
        sch.set_timesteps(steps or self.driver.steps, device=self.device)
        timesteps = list(sch.timesteps)
        x = x.to(self.device).double()

        def output_at(sample: torch.Tensor, t: Any, index: int) -> torch.Tensor:
            if hasattr(sch, "_step_index"):  # Euler's scale_model_input reads the sigma of the current step
                sch._step_index = index
            return self.driver.model_output(sample.to(self.dtype), t).double()

        if kind == "sigma":  # sampling: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * out(x_i, t_i)
            sigmas = sch.sigmas.double().to(self.device)
            for i in reversed(range(len(timesteps))):
                t, step = timesteps[i], sigmas[i + 1] - sigmas[i]
                out = output_at(x, t, i)
                for k in range(refine + 1):
                    x_i = x - step * out
                    if k < refine:
                        out = output_at(x_i, t, i)
                x = x_i
        else:  # DDIM eq. (12), inverted: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps
            ab = sch.alphas_cumprod.double().to(self.device)
            one = torch.ones((), dtype=torch.float64, device=self.device)
            if kind == "ddim":
                jump = sch.config.num_train_timesteps // sch.num_inference_steps
                final = torch.as_tensor(sch.final_alpha_cumprod, dtype=torch.float64, device=self.device)
                prevs = [ab[int(t) - jump] if int(t) - jump >= 0 else final for t in timesteps]
                clip = sch.config.clip_sample_range if sch.config.clip_sample else None
            else:
                prevs = [ab[int(t)] for t in timesteps[1:]] + [one]
                clip = None
            for i in reversed(range(len(timesteps))):
                t, ab_prev = timesteps[i], prevs[i]
                eps = output_at(x, t, i)
                for k in range(refine + 1):
                    x0 = (x - (1 - ab_prev).sqrt() * eps) / ab_prev.sqrt()
                    if clip is not None:  # sampling clips the predicted x_0; mirror it
                        x0 = x0.clamp(-clip, clip)
                    x_t = ab[int(t)].sqrt() * x0 + (1 - ab[int(t)]).sqrt() * eps
                    if k < refine:
                        eps = output_at(x_t, t, i)
                x = x_t
        if getattr(self.driver, "scale_initial_noise", True):  # the loop multiplies the noise by init_noise_sigma
            x = x / float(sch.init_noise_sigma)
        return x.float().cpu()

    def latent_coordinates(self, bases: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """For captum: the strengths alpha (B, K) of the K h-space directions, the base noises
        alongside, baseline alpha = 0 (no edit)."""
        bases = self._check_bases(bases)
        if self.n_latents == 0:
            raise ValueError(f"the {self.name} adapter has no directions: call adapter.set_directions(...) before ranking")
        alphas = torch.full((len(bases), self.n_latents), float(alpha), device=self.device)
        return alphas, (bases.to(self.device, self.dtype),), torch.zeros_like(alphas)

    def images_at(self, alphas: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] with h <- h + sum_k alpha_k s_k v_k on the edited steps (Kwon et al. 2023),
        differentiable in ``alphas``: gradients flow through every sampling step."""
        vectors = (self.directions * self.scales().view(-1, *([1] * (self.directions.ndim - 1)))).to(alphas.device)
        direction = torch.einsum("bk,k...->b...", alphas.to(vectors.dtype), vectors).to(self.dtype)
        expected = (len(noises), *self.h_shape(tuple(noises.shape[1:])))
        edit = Edit("add", torch.ones(len(noises), device=noises.device), direction=direction, calls=self.edit_calls)
        x = run_with_edit(self.driver, self.site, edit, noises, calls=self.n_calls, expected_shape=expected)
        return (x.float() + 1.0) / 2.0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "n_latents": self.n_latents, "model": self.model_id, "unet": type(self.unet).__name__,
            "scheduler": type(self.scheduler).__name__, "site": str(self.site), "steps": len(self.timesteps),
            "t_edit": self.t_edit, "edited_steps": self.edit_calls.stop, "scale": self.scale,
            "directions": {k: v for k, v in self.provenance.items() if k in ("finder", "site", "timestep", "model")},
        }
