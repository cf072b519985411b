"""Where directions come from: latent axes, user vectors (later: PCA, pull-back, conditional)."""

from .axes import axes, given
from .base import Directions

__all__ = ["Directions", "axes", "given"]
