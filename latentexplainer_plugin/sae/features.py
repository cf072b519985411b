"""SAE features as latents: latent i is SAE feature k = ``features[i]`` at a site of a generative model.

:class:`SAEFeatureAdapter` wraps an adapter that renders edits at a site (capability ``site_edits``:
``VAEAdapter``, ``GeneratorAdapter``, ``StyleGANAdapter`` and every sampling-loop adapter, ``ddpm``
to ``flux``) and explains the SAE's features there instead of the adapter's own latents:

1. Site: ``site=``, else the site recorded in the SAE file when it is a module path of the model,
   else the inner adapter's site. The SAE's ``d_in`` is checked against a probed shape (the model
   runs only up to the site) before any edited forward pass.
2. Feature statistics, from ``stats_bases`` latents drawn by the inner adapter's ``sample_bases``
   (seed ``stats_seed``, apart from the explanation bases, seed 0 by default): per base, the
   feature's peak activation over positions (a (B, D) site has one position) and, in a sampling
   loop, over the steps of the edit window (the steps the edit sets it on). From these:
   ``frequency`` (share of bases where it fires anywhere), ``position_frequency`` (share of all
   positions), ``median_active`` (median peak over the bases where it fires) and ``max``.
   A feature that never fires is **dead**; one firing at more than ``dense_frequency`` of the
   positions is **dense**.
3. Strengths, per feature, in units of its own activation distribution:
   ``quantiles`` (default) 0, median when active, max, 2 x max (the explainer's strengths are not
   used); ``relative`` the explainer's strengths times the feature's max; ``absolute`` the
   explainer's strengths as raw activations. A dead feature gets all-zero strengths in the first
   two modes: its strip shows no change, so it is never a clear explanation, and
   ``Traversal.meta["dead"]`` says why.
4. Traversal: feature k is set to each strength with the steering edit of
   :mod:`latentexplainer_plugin.sae.steering` (reconstruction error kept), through the inner
   adapter's ``render_edited``: once in a decoder, on every step of the edit window in a sampling
   loop (both guidance halves alike); every (feature, base, strength) goes through in batched
   calls of at most ``max_batch`` items.
5. Examples (after :meth:`SAEFeatureAdapter.attach_examples` with a dataset): the images where
   the feature fires most, across its activation quantiles, with activation maps, and images where
   it never fires (:mod:`latentexplainer_plugin.sae.examples`), as an ``ExampleSet`` per feature;
   the feature statistics of step 2 then come from the dataset instead of the sampled bases. The
   activation maps are read for ``block`` features per pass over the collection.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch
from pydantic import Field

from ..adapters.base import Adapter, check_strengths
from ..hooks import SiteError, edit_items, probe_shape, resolve_module
from ..options import ComponentOptions, validate_options
from ..types import Edit, Site, Traversal
from .formats import load_sae
from .model import SparseAutoencoder, parse_features
from .steering import RULE, SAEEdit

StrengthMode = Literal["quantiles", "relative", "absolute"]
STRENGTH_MODES = ("quantiles", "relative", "absolute")
MAX_SAE_VALUES = 2**25  # feature activations held at once (128 MiB in float32) while encoding a chunk


class SAEFeatureAdapter(Adapter):
    """Explain the features of a sparse autoencoder at a site of a generative model (a decoder or a sampling loop).

    Args:
        inner: an adapter with the ``site_edits`` capability (it supplies the bases and renders the edits).
        sae: a :class:`SparseAutoencoder` or the path of a saved one (see :func:`load_sae`).
        site: where the SAE reads the activations (module docstring, step 1).
        features: SAE feature numbers to explain (default: all); latent i is ``features[i]``, id ``f{k}``.
        strengths: ``quantiles``, ``relative`` or ``absolute`` (module docstring, step 3).
        stats_bases, stats_seed: the bases the feature statistics are estimated from (default 256 for a
            decoder, 32 for a sampling loop, where each base is a whole sampling run).
        feature_axis: where the features are in the site's activation (default: by shape, see
            :mod:`latentexplainer_plugin.sae.model`).
        dense_frequency: position frequency above which a feature counts as dense.
        allow_pickle: let ``sae`` be a dictionary_learning ``ae.pt`` (read with weights_only=True).
    """

    name = "sae"
    default_bias = "combination"  # an SAE feature has no partner latent to clamp in a second row
    capabilities: ClassVar[frozenset[str]] = frozenset({"sae_features"})
    #: ``site`` names where the SAE reads; the wrapped adapter keeps its own latent site.
    exclusive_options: ClassVar[frozenset[str]] = frozenset({"site"})

    class Options(ComponentOptions):
        site: str | None = Field(None, description="site the SAE reads (default: the SAE file's, else the model's)")
        features: list[int] | None = Field(None, description="SAE feature numbers to explain (default: all)")
        strengths: StrengthMode = Field("quantiles", description="strength units: quantiles (0, median when "
                                        "active, max, 2 x max), relative (x the feature's max) or absolute")
        stats_bases: int | None = Field(None, ge=1, le=100_000, description="bases the feature statistics come "
                                        "from (default: 256; 32 in a sampling loop, a sampling run each)")
        stats_seed: int = Field(1, description="seed of the statistics bases")
        feature_axis: int | None = Field(None, description="dim of the features in the site's activation "
                                         "(default: 1 for (B, C, H, W), else the last)")
        dense_frequency: float = Field(0.5, gt=0.0, le=1.0, description="a feature firing at more than this "
                                       "share of positions is dense")
        allow_pickle: bool = Field(False, description="accept dictionary_learning's ae.pt (weights_only=True)")
        sampled_examples: int | None = Field(None, ge=2, le=1_000_000, description="example evidence without a "
                                             "dataset: generate this many samples and show each feature those where it "
                                             "fires most (and where it never fires)")

    def __init__(self, inner: Adapter, sae: SparseAutoencoder | str | Path, site: Site | str | None = None,
                 features: Sequence[int] | None = None, strengths: str = "quantiles", stats_bases: int | None = None,
                 stats_seed: int = 1, feature_axis: int | None = None, dense_frequency: float = 0.5,
                 allow_pickle: bool = False, sampled_examples: int | None = None):
        validate_options(SAEFeatureAdapter.Options, {"strengths": strengths, "stats_bases": stats_bases, "stats_seed": stats_seed,
                                      "feature_axis": feature_axis, "dense_frequency": dense_frequency},
                         "the sae adapter")
        if "site_edits" not in getattr(inner, "capabilities", ()) or not (
                isinstance(getattr(inner, "driver", None), torch.nn.Module) and isinstance(getattr(inner, "site", None), Site)
                and callable(getattr(inner, "render_edited", None)) and callable(getattr(inner, "site_activations", None))):
            raise TypeError(f"SAEFeatureAdapter wraps an adapter that renders edits at a site (capability site_edits: a "
                            f"`driver` module, a `site`, render_edited and site_activations, as VAEAdapter and "
                            f"DDPMAdapter), got {type(inner).__name__}")
        if isinstance(sae, (str, Path)):
            sae = load_sae(sae, allow_pickle=allow_pickle)
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"sae must be a SparseAutoencoder or the path of a saved SAE, got {type(sae).__name__}")
        self.inner = inner
        self.sae = sae.to(inner.device).eval()
        self.site = self._choose_site(site)
        self.feature_axis = feature_axis
        self.strength_mode = strengths
        self.sampling_loop = "sampling_loop" in inner.capabilities
        if stats_bases is None:
            stats_bases = 32 if self.sampling_loop else 256
        self.stats_bases, self.stats_seed, self.dense_frequency = stats_bases, stats_seed, dense_frequency
        # 1. d_in against the probed site shape: fails before any edited forward pass
        probe = inner.sample_bases(1, seed=stats_seed).to(inner.device, getattr(inner, "dtype", None) or torch.float32)
        self.site_shape = tuple(probe_shape(inner.driver, self.site, probe))
        self.sae.check_site(self.site_shape, site=self.site, feature_axis=feature_axis)
        self.features = parse_features(features, self.sae.d_sae)
        self._stats: dict[str, torch.Tensor] | None = None
        self._examples: dict[str, Any] | None = None  # attach_examples: store, index, images, masks, sizes
        if sampled_examples is not None:
            validate_options(SAEFeatureAdapter.Options, {"sampled_examples": sampled_examples}, "the sae adapter")
            self.attach_sampled_examples(sampled_examples)

    def _choose_site(self, site: Site | str | None) -> Site:
        if isinstance(site, str):
            site = Site.parse(site)
        if site is None and self.sae.site:
            recorded = Site.parse(self.sae.site)
            try:
                resolve_module(self.inner.driver, recorded.path)
                site = recorded
            except SiteError:
                site = None  # a hook name of another library (blocks.8.hook_resid_pre): not a module path here
        site = site or self.inner.site
        try:
            resolve_module(self.inner.driver, site.path)
        except SiteError as exc:
            model = self._model_name()
            raise SiteError(str(exc).replace(type(self.inner.driver).__name__, model, 1)) from None
        return site

    def _model_name(self) -> str:
        for name in ("model", "unet", "driver"):  # the user's model, as the adapter names it
            model = getattr(self.inner, name, None)
            if model is not None:
                return type(model).__name__
        return type(self.inner).__name__

    # -- the Adapter interface
    @property
    def n_latents(self) -> int:
        return len(self.features)

    def latent_id(self, index: int) -> str:
        return f"f{self.features[index]}"

    def sample_bases(self, n: int, seed: int = 0) -> torch.Tensor:
        return self.inner.sample_bases(n, seed=seed)

    # -- feature statistics
    @torch.no_grad()
    def _compute_stats(self) -> dict[str, torch.Tensor]:
        bases = self.inner.sample_bases(self.stats_bases, seed=self.stats_seed)
        picked = torch.tensor(self.features, device=self.inner.device)
        peaks, active_positions, positions = [], torch.zeros(len(self.features), dtype=torch.float64), 0
        chunk = self._chunk()
        for start in range(0, len(bases), chunk):
            z = bases[start:start + chunk]
            per_call = self.inner.site_activations(z, self.site)  # (b, calls, *item): one call per edited step
            peak = None
            for call in range(per_call.shape[1]):  # one call at a time bounds the SAE's activations (see _chunk)
                h = per_call[:, call].to(self.inner.device, self.sae.W_enc.dtype)
                axis = self.sae.check_site(h.shape, site=self.site, feature_axis=self.feature_axis)
                acts = self.sae.encode_last(h.movedim(axis, -1)).index_select(-1, picked)  # (b, ..., F)
                acts = acts.reshape(len(z), -1, len(self.features))  # (b, positions, F)
                top = acts.amax(dim=1).float().cpu()
                peak = top if peak is None else torch.maximum(peak, top)
                active_positions += (acts > 0).sum(dim=(0, 1)).double().cpu()
                positions += acts.shape[0] * acts.shape[1]
            peaks.append(peak)
        peak = torch.cat(peaks)  # (N, F)
        fires = peak > 0
        masked = torch.where(fires, peak, torch.full_like(peak, float("nan")))
        median = masked.nanmedian(dim=0).values.nan_to_num(0.0)
        position_frequency = (active_positions / positions).float()
        return {"frequency": fires.float().mean(0), "position_frequency": position_frequency,
                "median_active": median, "max": peak.amax(0), "dead": ~fires.any(0),
                "dense": position_frequency > self.dense_frequency}

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        if self._stats is None:
            self._stats = self._compute_stats()
        return self._stats

    # -- example evidence (module docstring, step 5)
    @torch.no_grad()
    def attach_examples(self, images: Any, *, store: Any = None, masks: Any = None, encode: Any = None,
                        n_top: int = 10, n_quantiles: int = 10, n_contrast: int = 20, reservoir: int = 64,
                        seed: int = 0, batch: int = 256, block: int = 64) -> "SAEFeatureAdapter":
        """Give every feature example evidence from a dataset; feature statistics then come from it.

        ``images``: (N, H, W, 3) uint8 (the npz layout), item i of the activation collection is image i.
        ``store``: an activation collection (:mod:`~latentexplainer_plugin.sae.collect`) at this site;
        None: the images are encoded (``encode(x) -> bases``, default the inner model's ``encode``,
        first output, or for a sampling loop the adapter's ``invert``, on images scaled to [0, 1] as
        (N, C, H, W)) and rendered by the inner adapter, the activations at the site collected into a
        temporary directory (a sampling loop: every step of the inverted images' regeneration,
        approximately the images). ``masks``: (N, H, W) bool
        object masks (IoU of the activation masks in ``ExampleSet.meta["iou"]``). Per feature the
        set holds ``n_top`` top and ``n_quantiles`` quantile examples and ``n_contrast`` images
        where it never fires (:func:`~latentexplainer_plugin.sae.examples.index_examples`).
        ``block``: features whose activation maps are read in one pass over the store (see
        :meth:`example_set`): explaining F features reads the store about F / ``block`` times.
        """
        import tempfile

        import numpy as np

        from .collect import ActivationStore, collect_from_adapter
        from .examples import BlockedExamples, ExamplesError, index_examples

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ExamplesError(f"images must be (N, H, W, 3) uint8 (the npz layout), got {images.shape} {images.dtype}")
        if masks is not None:
            masks = np.asarray(masks)
            if masks.shape != images.shape[:3]:
                raise ExamplesError(f"masks must be (N, H, W) = {images.shape[:3]} like the images, got {masks.shape}")
        for name, value in (("n_top", n_top), ("n_quantiles", n_quantiles), ("n_contrast", n_contrast), ("batch", batch),
                            ("block", block)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ExamplesError(f"{name} must be an int >= 1, got {value!r}")
        tmp = None
        if store is None:
            encoder = encode if encode is not None else self._image_encoder()
            tmp = tempfile.TemporaryDirectory(prefix="latentexplainer-examples-")

            def bases():
                for start in range(0, len(images), batch):
                    x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).permute(0, 3, 1, 2).float() / 255.0
                    z = encoder(x.to(self.inner.device))
                    yield (z[0] if isinstance(z, (tuple, list)) else z).float()

            collect_from_adapter(self.inner, self.site, bases, tmp.name)
            store = tmp.name
        store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        if store.manifest.n_items != len(images):
            raise ExamplesError(f"the activation collection at {store.directory} has {store.manifest.n_items} items but "
                                f"{len(images)} images were given; item i must be image i")
        sae = self.sae if self.sae.W_enc.device.type == "cpu" else copy.deepcopy(self.sae).cpu()
        index = index_examples(sae, store, top_k=n_top, reservoir=max(reservoir, n_quantiles), contrast=n_contrast, seed=seed)
        self._examples = {"store": store, "index": index, "masks": masks, "tmp": tmp, "n_top": n_top,
                          "n_quantiles": n_quantiles, "n_contrast": n_contrast,
                          "sets": BlockedExamples(sae, store, index, self.features, images, masks=masks, n_top=n_top,
                                                  n_quantiles=n_quantiles, n_contrast=n_contrast, block=block)}
        stats = index.statistics(self.features)
        stats["dense"] = stats["position_frequency"] > self.dense_frequency
        self._stats = stats
        return self

    def _image_encoder(self) -> Any:
        """Images (n, C, H, W) in [0, 1] -> the bases the inner adapter renders them from: the model's
        ``encode`` (a VAE), or the sampler run backwards (``invert``, adapters with ``inversion``)."""
        from .examples import ExamplesError

        if self.sampling_loop:
            if "inversion" not in self.inner.capabilities:
                raise ExamplesError(f"the {self.inner.name} adapter samples from noise and cannot invert images, so images "
                                    f"have no way to the site {self.site}: give example evidence as an activation "
                                    "collection (store=) whose item i is image i, or use the model's own samples "
                                    "(attach_sampled_examples)")
            return self.inner.invert  # deterministic inversion: the noises that sampling turns into the images
        encoder = getattr(getattr(self.inner, "model", None), "encode", None)
        if not callable(encoder):
            raise ExamplesError(f"{self._model_name()} has no encode(); give an activation collection "
                                "(store=) at the site, or encode= (images -> latents)")
        return encoder

    @torch.no_grad()
    def attach_sampled_examples(self, n: int, seed: int = 2, batch: int | None = None, **options: Any) -> "SAEFeatureAdapter":
        """Example evidence from the model's own samples, for models without a dataset (diffusion,
        GANs): ``n`` bases drawn with ``seed`` (apart from the explanation bases, seed 0, and the
        statistics', ``stats_seed``) are rendered, their activations at the site collected (every call
        of the site: in a sampling loop every step, the conditional half under guidance), and the
        rendered images serve as the dataset of :meth:`attach_examples` (``options``: its ``n_top``,
        ``n_quantiles``, ``n_contrast``, ...). One pass over the bases renders and collects (the
        adapter's ``output_to_images`` turns the driver's output into the images).
        """
        import tempfile

        import numpy as np

        from .collect import collect_from_adapter

        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an int >= 2 (samples to find examples among), got {n!r}")
        inner = self.inner
        if not callable(getattr(inner, "output_to_images", None)):
            raise TypeError(f"sampled examples need the {inner.name} adapter's output_to_images(output) (its driver's "
                            "output as images in [0, 1]), as VAEAdapter and DDPMAdapter have")
        bases = inner.sample_bases(n, seed=seed)
        batch = batch or self._chunk()
        tmp = tempfile.TemporaryDirectory(prefix="latentexplainer-sampled-")
        rendered: list[torch.Tensor] = []
        collect_from_adapter(inner, self.site, bases, tmp.name, batch_size=batch, images=rendered)
        images = (torch.cat(rendered).permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8).numpy()
        if images.shape[-1] not in (1, 3) or len(images) != n:
            raise ValueError(f"sampled examples need {n} images with 1 or 3 channels, the model rendered "
                             f"{tuple(images.shape)}")
        self.attach_examples(np.ascontiguousarray(images), store=tmp.name, **options)
        self._examples["tmp"] = tmp  # removed with the adapter
        self._examples["sampled"] = {"n": n, "seed": seed}
        return self

    @property
    def has_examples(self) -> bool:
        """True once :meth:`attach_examples` gave the features example evidence."""
        return self._examples is not None

    def example_set(self, index: int) -> Any:
        """The :class:`~latentexplainer_plugin.types.ExampleSet` of latent ``index`` (None without
        :meth:`attach_examples`).

        The activation maps of latent ``index`` and of the next ``block - 1`` latents not yet
        served are read in one pass over the store and held until each is asked for (latents are
        explained in increasing order, so a run reads the store about n_latents / ``block`` times).
        """
        if self._examples is None:
            return None
        i = self.check_index(index)
        return self._examples["sets"].get(i, latent_id=self.latent_id(i))

    def prefetch_examples(self, indices: Sequence[int]) -> None:
        """Read the example sets and activation maps of latents ``indices`` in one pass over the
        store; :meth:`example_set` then serves them without reading it. Replaces earlier prefetches."""
        from .examples import ExamplesError

        if self._examples is None:
            raise ExamplesError("no example evidence to prefetch: call attach_examples(images, ...) first")
        self._examples["sets"].prefetch([self.check_index(i) for i in indices])

    def feature_stats(self) -> list[dict[str, Any]]:
        """Per latent: feature number, frequency, position_frequency, median_active, max, dead, dense."""
        return [self.feature_extras(i) for i in range(self.n_latents)]

    def feature_extras(self, index: int) -> dict[str, Any]:
        """What the statistics say about latent ``index`` (for results.json: dead features are marked)."""
        s = self.stats
        return {"feature": self.features[index], "dead": bool(s["dead"][index]), "dense": bool(s["dense"][index]),
                "stats_source": "data" if self._examples is not None else "samples",
                "frequency": round(float(s["frequency"][index]), 4),
                "position_frequency": round(float(s["position_frequency"][index]), 4),
                "median_active": round(float(s["median_active"][index]), 6), "max": round(float(s["max"][index]), 6)}

    def latent_extras(self, index: int) -> dict[str, Any]:
        """What results.json records per latent (the run store asks every adapter): :meth:`feature_extras`."""
        return self.feature_extras(index)

    def dead_latents(self) -> list[int]:
        """Latent indices whose feature never fired on the statistics bases."""
        return [i for i in range(self.n_latents) if bool(self.stats["dead"][i])]

    def feature_strengths(self, index: int, strengths: torch.Tensor) -> torch.Tensor:
        """The target activations of latent ``index`` (module docstring, step 3)."""
        if self.strength_mode == "absolute":
            return strengths.clone()
        top = float(self.stats["max"][index])
        if self.strength_mode == "relative":
            return strengths * top
        return torch.tensor([0.0, float(self.stats["median_active"][index]), top, 2.0 * top])

    # -- traversal
    @torch.no_grad()
    def traverse(self, indices: Sequence[int], bases: torch.Tensor, strengths: Sequence[float] | torch.Tensor,
                 rows: int = 1, **_: Any) -> list[Traversal]:
        """One Traversal per latent index: its feature set to each of its strengths, from each base."""
        if rows != 1:
            raise ValueError(f"an SAE feature has no partner latent to clamp, so the bias cannot compare {rows} rows: "
                             "use the combination bias")
        strengths = check_strengths(strengths)
        bases = self.inner._check_bases(bases)
        indices = [self.check_index(i) for i in indices]
        if not indices:
            raise ValueError("nothing to traverse: indices is empty")
        targets = torch.stack([self.feature_strengths(i, strengths) for i in indices])  # (F, S)
        n_lat, n, s = len(indices), len(bases), targets.shape[1]
        z = bases[None, :, None].expand(n_lat, n, s, *bases.shape[1:]).reshape(-1, *bases.shape[1:])
        flat_targets = targets[:, None, :].expand(n_lat, n, s).reshape(-1)
        flat_features = torch.tensor([self.features[i] for i in indices]).repeat_interleave(n * s)
        edit = SAEEdit(RULE, flat_targets, index=flat_features, sae=self.sae, feature_axis=self.feature_axis)
        images = self._render(z, edit)
        images = images.view(n_lat, n, 1, s, *images.shape[1:])

        out = []
        for li, i in enumerate(indices):
            extras = self.feature_extras(i)
            out.append(Traversal(
                latent_id=self.latent_id(i), images=images[li], strengths=targets[li], rule=RULE, index=i,
                base_latents=bases[:, None] if bases.ndim == 2 else bases, row_labels=[""],
                meta={"site": str(self.site), "feature": self.features[i], "strength_units": self.strength_mode,
                      "dead": extras["dead"], "stats": extras}))
        return out

    # -- captum: ranking features by an attributed score (ranking.LatentScore)
    def latent_coordinates(self, bases: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """For captum: per base, a step alpha_k (B, K) along each feature's decoder direction in units of
        the feature's max, the bases alongside, baseline alpha = 0 (no edit)."""
        bases = self.inner._check_bases(bases)
        alphas = torch.full((len(bases), self.n_latents), float(alpha))
        return alphas, (bases,), torch.zeros_like(alphas)

    def images_at(self, alphas: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] with h <- h + sum_k alpha_k max_k d_k at every position of the site (on every
        edited step of a sampling loop), differentiable in ``alphas``. A dead feature (max 0) gets no
        attribution."""
        scale = self.stats["max"].to(self.sae.W_dec.dtype)
        rows = self.sae.decoder_directions()[torch.tensor(self.features)] * scale[:, None]  # (K, d_in)
        moved = alphas.to(rows.dtype) @ rows.to(alphas.device)  # (B, d_in)
        axis = self.sae.axis_for(len(self.site_shape), self.feature_axis)
        shape = [len(alphas)] + [1] * (len(self.site_shape) - 1)
        shape[axis] = self.sae.d_in
        direction = moved.view(shape).expand(len(alphas), *self.site_shape[1:])
        edit = Edit("add", torch.ones(len(alphas), device=alphas.device), direction=direction)
        return self.inner.render_edited(bases, edit, self.site)

    def _chunk(self) -> int:
        """Bases per rendering call: ``max_batch``, fewer when the SAE's activations at one call of
        the site (every guidance copy) would pass ~2**25 values."""
        positions = 1
        axis = self.sae.axis_for(len(self.site_shape), self.feature_axis)
        for dim, size in enumerate(self.site_shape[1:], start=1):
            positions *= size if dim != axis else 1
        copies = int(getattr(self.inner, "copies", 1))
        return max(1, min(self.inner.max_batch, MAX_SAE_VALUES // max(1, copies * positions * self.sae.d_sae)))

    def _render(self, z: torch.Tensor, edit: SAEEdit) -> torch.Tensor:
        chunks, chunk = [], self._chunk()
        for start in range(0, len(z), chunk):
            part = edit_items(edit, slice(start, start + chunk), len(self.site_shape) - 1)
            chunks.append(self.inner.render_edited(z[start:start + chunk], part, self.site))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def describe(self) -> dict[str, Any]:
        s = self.stats
        return {"name": self.name, "n_latents": self.n_latents, "inner": self.inner.describe(), "site": str(self.site),
                "sae": self.sae.describe(), "strength_units": self.strength_mode, "stats_bases": self.stats_bases,
                "stats_seed": self.stats_seed, "dead": int(s["dead"].sum()), "dense": int(s["dense"].sum()),
                "stats_source": "data" if self._examples is not None else "samples"} | (
            {"examples": {"n_items": int(self._examples["index"].n_items), "n_top": self._examples["n_top"],
                          "n_quantiles": self._examples["n_quantiles"], "n_contrast": self._examples["n_contrast"],
                          "masks": self._examples["masks"] is not None}} if self._examples is not None else {})
