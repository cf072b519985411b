"""Sparse autoencoders (SAEs) at a site of a model: load, steer, and explain their features as latents.

- :class:`SparseAutoencoder` (``model.py``): standard / topk / jumprelu SAEs, SAELens tensor names.
- :func:`load_sae` / :func:`save_sae` (``formats.py``): SAELens, sparsify and dictionary_learning layouts.
- :func:`sae_edit` / :class:`SAEEdit` (``steering.py``): h' = h + (a - f_k(h)) d_k, batched.
- :class:`SAEFeatureAdapter` (``features.py``): SAE features as the latents of a VAE or generator.
"""

from .features import SAEFeatureAdapter
from .formats import detect_layout, load_sae, save_sae
from .model import ARCHITECTURES, SAEError, SparseAutoencoder
from .steering import SAEEdit, sae_edit

__all__ = [
    "ARCHITECTURES", "SAEEdit", "SAEError", "SAEFeatureAdapter", "SparseAutoencoder", "detect_layout", "load_sae",
    "sae_edit", "save_sae",
]
