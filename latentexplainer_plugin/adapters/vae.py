"""VAE adapter: traverse the latent input of a decoder, every latent x step x row in batched calls.

1. Bases z ~ N(0, I) (or the user's latents), shape (n_bases, D).
2. Rows (disentanglement comparison): row r clamps another latent z_j at ``clamp_values[r]``.
3. The traversal itself is an nnsight edit at the decoder's input site: ``set`` puts z_i := s for
   each strength s (the paper's traversal), ``add`` moves z + s * v along a direction v.
4. All (latent, base, row, step) combinations decode together, in chunks of ``max_batch``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from pydantic import Field

from ..hooks import SiteError, check_finite, edit_items, probe_shape, resolve_module, run_with_edit
from ..hooks.sites import site_activation
from ..options import ComponentOptions, PositiveInt, SiteName, validate_options
from ..plugins import hook
from ..types import Edit, Site, Traversal
from .base import Adapter, check_strengths

DEFAULT_CLAMP_VALUES = (-1.5, 1.5)


class _DecodeDriver(nn.Module):
    """Runs ``model.decode(z)`` (or ``model.decoder(z)``) as a forward pass, keeping the model's module paths."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self._decode = model.decode if callable(getattr(model, "decode", None)) else model.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self._decode(z)
        if isinstance(out, tuple):
            out = out[0]
        return getattr(out, "sample", out)  # diffusers' DecoderOutput


def load_vae(path: str | Path, device: str = "cpu", allow_pickle: bool = False) -> nn.Module:
    """Load a VAE saved by ``train-vae`` (config.json + model.safetensors), or a diffusers AutoencoderKL.

    ``allow_pickle``: accept a pickle checkpoint instead of safetensors (read with weights_only=True).
    """
    from ..safe_load import LoadError, read_config

    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such directory (a VAE directory holds config.json and model.safetensors)")
    from .loading import AUTOENCODER_LIMITS, CONV_VAE_LIMITS, MAX_CONV_VAE_PARAMETERS, check_config_sizes, check_parameter_count
    from .loading import check_pickle_policy, use_safetensors

    config = read_config(path / "config.json")
    if config.get("_class_name") == "AutoencoderKL":
        from diffusers import AutoencoderKL

        check_config_sizes(config, AUTOENCODER_LIMITS, path / "config.json")
        check_pickle_policy(path, allow_pickle, "AutoencoderKL")
        try:
            model = AutoencoderKL.from_pretrained(str(path), use_safetensors=use_safetensors(allow_pickle, path))
        except (OSError, ValueError) as exc:
            raise LoadError(f"could not load an AutoencoderKL from {path}: {str(exc).strip().splitlines()[0][:300]}") from None
        return model.to(device).eval()
    from dataclasses import fields

    from ..models.conv_vae import ConvVAE, ConvVAEConfig

    if config.get("model_type", "conv-vae") == "conv-vae":
        check_config_sizes(config, CONV_VAE_LIMITS, path / "config.json")
        known = {f.name for f in fields(ConvVAEConfig)}
        try:
            cfg = ConvVAEConfig(**{k: v for k, v in config.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise LoadError(f"{path / 'config.json'}: {exc}") from None
        check_parameter_count(lambda: ConvVAE(cfg), path / "config.json", MAX_CONV_VAE_PARAMETERS)
    return ConvVAE.from_pretrained(path, device=device, allow_pickle=allow_pickle)


class VAEOptions(ComponentOptions):
    """Options of the ``vae`` adapter."""

    site: Optional[SiteName] = Field(None, description="latent site, e.g. decoder.input (default: per architecture)")
    max_batch: PositiveInt = Field(512, description="images decoded together")
    device: str = Field("cpu", description="torch device (the run's --device)")
    allow_pickle: bool = Field(False, description="accept a pickle checkpoint (.pt/.bin) when there is no safetensors")


class VAEAdapter(Adapter):
    """Explain the latent dimensions of a VAE decoder (``model.decode(z)`` or ``model.decoder(z)``).

    ``model`` may be a directory (``train-vae`` output or a diffusers AutoencoderKL): it is loaded
    with :func:`load_vae` (``allow_pickle`` as there)."""

    name = "vae"
    Options = VAEOptions
    capabilities = frozenset({"latent_axes", "site_edits"})

    def __init__(self, model: nn.Module | str | Path, site: Site | str | None = None, latent_dim: int | None = None,
                 output_range: tuple[float, float] = (0.0, 1.0), max_batch: int = 512, device: str = "cpu",
                 allow_pickle: bool = False):
        if isinstance(model, (str, Path)):
            model = load_vae(model, device=device, allow_pickle=allow_pickle)
        if not isinstance(model, nn.Module):
            raise TypeError(f"VAEAdapter needs a torch nn.Module (or a model directory), got {type(model).__name__}")
        if not (callable(getattr(model, "decode", None)) or isinstance(getattr(model, "decoder", None), nn.Module)):
            raise TypeError(f"{type(model).__name__} has neither a decode(z) method nor a decoder module")
        self.model = model.eval()
        self.driver = _DecodeDriver(model).eval()
        if isinstance(site, str):
            site = Site.parse(site)
        self.site = site or hook().latentexplainer_default_site(model=model)
        if self.site is None:
            raise ValueError(f"no plugin knows the default latent site of a {type(model).__name__} (it has no decoder "
                             "module); pass site= (e.g. decoder.input)")
        try:
            resolve_module(self.driver, self.site.path)
        except SiteError as exc:  # name the user's model, not the internal decode wrapper
            raise SiteError(str(exc).replace(type(self.driver).__name__, type(model).__name__, 1)) from None
        self.latent_dim = int(latent_dim or getattr(model, "latent_dim", 0) or getattr(getattr(model, "config", None), "latent_dim", 0))
        if self.latent_dim < 1:
            raise ValueError(f"cannot tell the latent size of {type(model).__name__}: pass latent_dim=")
        lo, hi = output_range
        if not hi > lo:
            raise ValueError(f"output_range must be (low, high) with high > low, got {output_range}")
        self.output_range = (float(lo), float(hi))
        validate_options(VAEOptions, {"max_batch": max_batch}, "the vae adapter")  # the declared check
        self.max_batch = max_batch
        self.device = torch.device(device)
        self._features: dict[Site, tuple[int, ...]] = {}  # per-item activation shape per site

    @property
    def n_latents(self) -> int:
        return self.latent_dim

    def latent_id(self, index: int) -> str:
        return f"z{index}"

    def sample_bases(self, n: int, seed: int = 0) -> torch.Tensor:
        if n < 1:
            raise ValueError(f"need at least 1 base latent, got {n}")
        return torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(seed))

    def _check_bases(self, bases: torch.Tensor) -> torch.Tensor:
        bases = torch.as_tensor(bases, dtype=torch.float32)
        if bases.ndim == 1:
            bases = bases[None]
        if bases.ndim != 2 or bases.shape[1] != self.latent_dim:
            raise ValueError(f"base latents must have shape (n, {self.latent_dim}), got {tuple(bases.shape)}")
        check_finite(bases, "base latents")
        return bases

    def _site_features(self, z: torch.Tensor, site: Site | None = None) -> tuple[int, ...]:
        # The activation's per-item shape at a site, probed once per site (runs the decoder up to it).
        site = site or self.site
        if site not in self._features:
            self._features[site] = tuple(probe_shape(self.driver, site, z[:1])[1:])
        return self._features[site]

    def render_edited(self, bases: torch.Tensor, edit: Edit, site: Site | None = None) -> torch.Tensor:
        """Decode latents ``bases`` (B, D) with ``edit`` (one strength per item) applied at ``site``
        (default: the latent site); images (B, C, H, W) in [0, 1], in chunks of ``max_batch``;
        differentiable in the edit's tensors when gradients are enabled (traversals run without)."""
        site = site or self.site
        z = self._check_bases(bases)
        chunks = []
        for start in range(0, len(z), self.max_batch):
            zb = z[start:start + self.max_batch].to(self.device)
            item_shape = self._site_features(zb, site)
            part = edit_items(edit, slice(start, start + self.max_batch), len(item_shape))
            chunks.append(run_with_edit(self.driver, site, part, zb, expected_shape=(len(zb), *item_shape)).float().cpu())
        return self.output_to_images(chunks[0] if len(chunks) == 1 else torch.cat(chunks))

    def output_to_images(self, output: torch.Tensor) -> torch.Tensor:
        """The driver's output (images in ``output_range``) as images in [0, 1] on the CPU."""
        images = output.float().cpu()
        lo, hi = self.output_range
        if (lo, hi) != (0.0, 1.0):
            images = (images - lo) / (hi - lo)
        return images.clamp(0.0, 1.0)  # out of place: the decoder output may be needed for gradients

    @torch.no_grad()
    def site_activations(self, bases: torch.Tensor, site: Site | None = None) -> torch.Tensor:
        """The activation at ``site`` for latents ``bases``: (B, 1, *item shape), one call per image
        (the layout of the sampling-loop adapters, whose site runs once per step)."""
        z = self._check_bases(bases).to(self.device)
        return site_activation(self.driver, site or self.site, z)[:, None]

    def traverse(self, indices: Sequence[int], bases: torch.Tensor, strengths: Sequence[float] | torch.Tensor,
                 rows: int = 1, *, clamp: Mapping[int, int] | Callable[[int], int] | None = None,
                 clamp_values: Sequence[float] = DEFAULT_CLAMP_VALUES,
                 directions: torch.Tensor | None = None, **_: Any) -> list[Traversal]:
        """Traverse each latent in ``indices`` (``set`` rule) or each row of ``directions`` (``add`` rule).

        With ``rows=2`` (disentanglement), row r holds latent ``clamp[i]`` at ``clamp_values[r]``.
        """
        strengths = check_strengths(strengths)
        bases = self._check_bases(bases)
        n, d = bases.shape
        s = len(strengths)
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if rows > 1 and len(clamp_values) != rows:
            raise ValueError(f"{rows} rows need {rows} clamp_values, got {list(clamp_values)}")
        if directions is not None:
            directions = torch.as_tensor(directions, dtype=torch.float32)
            if directions.ndim != 2 or directions.shape[1] != d:
                raise ValueError(f"directions must have shape (k, {d}), got {tuple(directions.shape)}")
            check_finite(directions, "directions")
            norms = directions.norm(dim=1)
            if (norms < 1e-8).any():
                raise ValueError(f"direction(s) {torch.nonzero(norms < 1e-8).flatten().tolist()} have zero norm")
            indices = list(range(len(directions)))
        else:
            indices = [self.check_index(i) for i in indices]
        if not indices:
            raise ValueError("nothing to traverse: indices is empty")

        # (latent, base, row, step) -> one flat batch
        z = bases[None, :, None, None, :].expand(len(indices), n, rows, s, d).clone()
        clamped: list[int | None] = []
        for li, i in enumerate(indices):
            j = None
            if rows > 1:
                j = clamp(i) if callable(clamp) else (clamp or {}).get(i, (i + 1) % d)
                if directions is None and j == i:
                    raise ValueError(f"latent {i} cannot be clamped against itself")
                z[li, :, :, :, j] = torch.as_tensor(list(clamp_values), dtype=torch.float32)[None, :, None]
            clamped.append(j)
        flat = z.reshape(-1, d)
        step_strengths = strengths.repeat(len(indices) * n * rows)
        if directions is None:
            index = torch.tensor(indices).repeat_interleave(n * rows * s)
            edit = Edit("set", step_strengths, index=index)
        else:
            edit = Edit("add", step_strengths, direction=directions.repeat_interleave(n * rows * s, dim=0))
        with torch.no_grad():
            images = self.render_edited(flat, edit)
        images = images.view(len(indices), n, rows, s, *images.shape[1:])

        out = []
        for li, i in enumerate(indices):
            j = clamped[li]
            labels = [f"z{j} = {v:+g}" for v in clamp_values] if j is not None else [""]
            out.append(Traversal(
                latent_id=f"dir{i}" if directions is not None else self.latent_id(i),
                images=images[li], strengths=strengths, rule="add" if directions is not None else "set",
                index=i, direction=directions[i] if directions is not None else None,
                base_latents=z[li, :, :, 0], row_labels=labels, meta={"clamped": j, "site": str(self.site)},
            ))
        return out

    def latent_statistics(self, data: dict[str, Any]) -> Any:
        """KL per latent and the factor each captures, from the encoder on ``data``'s images (None without an encoder)."""
        if not callable(getattr(self.model, "encode", None)):
            return None
        from ..models.statistics import latent_stats

        return latent_stats(self.model, data["images"], data.get("factors"), data.get("factor_names"))

    def latent_coordinates(self, bases: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """For captum: the site activation flattened to (B, D), what travels with it, baseline 0.

        With the default site ``decoder.input`` that is z itself and the decoder runs directly; at
        any other site the activation is replaced through nnsight (the base latents travel as
        ``additional_forward_args``, which captum expands along with the inputs)."""
        from ..hooks import capture

        bases = self._check_bases(bases).to(self.device)
        with torch.no_grad():
            act = capture(self.driver, self.site, bases, observe=False)[0].flatten(1).float()
        if act.shape == bases.shape and torch.allclose(act, bases):  # the site holds z itself
            return bases.clone(), None, torch.zeros_like(bases)
        return act, (bases, act), torch.zeros_like(act)

    def images_at(self, inputs: torch.Tensor, *extra: Any) -> torch.Tensor:
        """Images in [0, 1] for the coordinates of :meth:`latent_coordinates`, differentiable in ``inputs``."""
        lo, hi = self.output_range
        if not extra:  # decoder.input: z itself
            out = self.driver(inputs)
        else:  # replace the site activation with ``inputs``: act0 + 1 * (inputs - act0)
            bases, act0 = extra
            shape = (len(inputs), *self._site_features(bases))
            edit = Edit("add", torch.ones(len(inputs), device=inputs.device), direction=(inputs - act0).view(shape))
            out = run_with_edit(self.driver, self.site, edit, bases, expected_shape=shape)
        return (out.float() - lo) / (hi - lo)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"site": str(self.site), "model": type(self.model).__name__}
