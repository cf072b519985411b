"""The ``vlm`` adapter: features of a sparse autoencoder on a VLM's language model, at the image tokens.

Latent i is SAE feature ``features[i]`` at the output of decoder layer ``layer``, read at the
image-token positions of the chat prompt (:func:`.activations.collect_image_token_activations`).
A VLM feature has no image traversal (steering it changes the text the model writes, not an
image), so the adapter declares the capability ``examples_only``: :class:`LatentExplainer`
explains each feature from its example set alone (the images where it fires most, across its
activation quantiles, with activation maps, against images where it never fires), through
the backend's ``explain_examples`` and the same certainty, results.json and report as every
other latent. :meth:`attach_examples` gives the features their dataset (required before
explaining).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
from pydantic import Field

from ..adapters.base import Adapter
from ..errors import VLMError
from ..options import ComponentOptions, NonNegativeInt, PositiveInt, validate_options
from ..types import Traversal
from ..sae.model import parse_features

__all__ = ["VLMFeatureAdapter", "VLMFeatureOptions"]


class VLMFeatureOptions(ComponentOptions):
    """Options of the ``vlm`` adapter."""

    sae: Optional[str] = Field(None, description="directory of an SAE trained at the layer's image tokens (required; any registered SAE format)")
    layer: NonNegativeInt = Field(0, description="decoder layer of the language model whose output the SAE reads")
    features: str | None = Field(None, description="comma-separated SAE features to explain (default: all)")
    n_top: PositiveInt = Field(5, description="top examples per feature")
    n_quantiles: PositiveInt = Field(10, description="examples across the activation quantiles per feature")
    n_contrast: PositiveInt = Field(15, description="images where the feature never fires, per feature")
    device: str = Field("cpu", description="torch device (the run's --device)")


class VLMFeatureAdapter(Adapter):
    """Explain SAE features of a VLM's language model at the image tokens, from their examples.

    ``model``: a VLM directory (``AutoProcessor`` + ``AutoModelForImageTextToText``) or a
    ``(model, processor)`` pair; ``sae``: a directory (:func:`~latentexplainer_plugin.sae.load_sae`)
    or a :class:`~latentexplainer_plugin.sae.SparseAutoencoder` whose ``d_in`` is the language
    model's width."""

    name = "vlm"
    Options = VLMFeatureOptions
    capabilities: ClassVar[frozenset[str]] = frozenset({"sae_features", "examples_only"})

    def __init__(self, model: Any, sae: Any = None, layer: int = 0, features: str | Sequence[int] | None = None,
                 n_top: int = 5, n_quantiles: int = 10, n_contrast: int = 15, device: str = "cpu") -> None:
        from ..sae import SparseAutoencoder, load_sae
        from .lens import language_model

        if sae is None:
            raise VLMError("the vlm adapter needs sae= (a directory or a SparseAutoencoder trained at the layer's image tokens)")
        validate_options(VLMFeatureOptions, {"layer": layer, "n_top": n_top, "n_quantiles": n_quantiles,
                                             "n_contrast": n_contrast, "device": device}, "the vlm adapter")
        if isinstance(model, (str, Path)):
            from .build import load_demo_vlm  # the generic AutoProcessor + AutoModelForImageTextToText path

            model, processor = load_demo_vlm(model, device=device)
        elif isinstance(model, tuple) and len(model) == 2:
            model, processor = model
        else:
            raise VLMError(f"model must be a VLM directory or a (model, processor) pair, got {type(model).__name__}")
        self.model, self.processor = model.eval(), processor
        n_layers = len(language_model(model).layers)
        if not 0 <= layer < n_layers:
            raise VLMError(f"layer must be in 0..{n_layers - 1} (the language model has {n_layers} decoder layers), got {layer}")
        self.layer = int(layer)
        self.sae = sae if isinstance(sae, SparseAutoencoder) else load_sae(sae)
        width = int(model.get_input_embeddings().weight.shape[1])
        if int(self.sae.d_in) != width:
            raise VLMError(f"the SAE reads d_in={int(self.sae.d_in)} numbers per token, but the language model's hidden "
                           f"states have {width}; give an SAE trained at this model's layers")
        self.features = tuple(parse_features(features, int(self.sae.d_sae)))
        self.n_top, self.n_quantiles, self.n_contrast = int(n_top), int(n_quantiles), int(n_contrast)
        self.device = torch.device(device)
        self._examples: dict[str, Any] | None = None

    # -- latents -------------------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return len(self.features)

    def latent_id(self, index: int) -> str:
        return f"f{self.features[self.check_index(index)]}"

    def sample_bases(self, n: int, seed: int = 0) -> torch.Tensor:
        """No bases: the features are explained from their examples (an empty (n, 0) tensor)."""
        return torch.zeros(n, 0)

    def traverse(self, indices: Sequence[int], bases: torch.Tensor, strengths: torch.Tensor,
                 rows: int = 1, **options: Any) -> list[Traversal]:
        raise VLMError("a VLM feature has no image traversal (steering it changes the text, not an image); it is "
                       "explained from its examples (capability examples_only): call attach_examples(images) first")

    # -- example evidence ----------------------------------------------------------------------
    def attach_examples(self, images: Any, *, masks: Any = None, **_: Any) -> "VLMFeatureAdapter":
        """Collect the layer's image-token activations of ``images`` ((N, H, W, 3) uint8) and index every
        feature's examples; ``masks`` ((N, H, W) bool object masks) add the IoU of the activation masks."""
        from ..sae.examples import BlockedExamples, index_examples
        from .activations import collect_image_token_activations

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise VLMError(f"images must be (N, H, W, 3) uint8 (the npz layout), got {images.shape} {images.dtype}")
        if masks is not None and np.asarray(masks).shape != images.shape[:3]:
            raise VLMError(f"masks must be (N, H, W) = {images.shape[:3]} like the images, got {np.asarray(masks).shape}")
        tmp = tempfile.TemporaryDirectory(prefix="latentexplainer-vlm-")
        collect_image_token_activations(self.model, self.processor, images, self.layer, Path(tmp.name) / "acts")
        store = Path(tmp.name) / "acts"
        index = index_examples(self.sae, store, top_k=self.n_top, reservoir=max(64, self.n_quantiles),
                               contrast=self.n_contrast)
        self._examples = {"tmp": tmp, "store": store, "index": index, "images": images, "masks": masks,
                          "stats": index.statistics(self.features), "dense": set(index.dense_features()),
                          "sets": BlockedExamples(self.sae, store, index, self.features, images, masks=masks,
                                                  n_top=self.n_top, n_quantiles=self.n_quantiles,
                                                  n_contrast=self.n_contrast)}
        return self

    @property
    def has_examples(self) -> bool:
        return self._examples is not None

    def example_set(self, index: int) -> Any:
        """The :class:`~latentexplainer_plugin.types.ExampleSet` of latent ``index`` (activation maps are
        read for a block of 64 features per pass over the collection: ``sae.examples.BlockedExamples``)."""
        if self._examples is None:
            raise VLMError("no examples yet: call attach_examples(images) first (the images the features are read on)")
        return self._examples["sets"].get(self.check_index(index), latent_id=self.latent_id(index))

    def latent_extras(self, index: int) -> dict[str, Any]:
        """Feature statistics from the data: frequency, dead, dense (after :meth:`attach_examples`)."""
        if self._examples is None:
            return {}
        s = self._examples["stats"]
        return {"feature": self.features[index], "frequency": round(float(s["frequency"][index]), 4),
                "dead": bool(s["dead"][index]), "dense": self.features[index] in self._examples["dense"]}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n_latents": self.n_latents, "layer": self.layer, "site": "image tokens",
                "sae": self.sae.describe(), "model": type(self.model).__name__}
