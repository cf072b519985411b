"""Where directions come from: latent axes, user vectors, PCA, Jacobian pull-back, label-conditional means."""

from .axes import axes, given
from .base import Directions
from .conditional import conditional
from .pca import pca
from .pullback import PullbackDirections, pullback

__all__ = ["Directions", "PullbackDirections", "axes", "conditional", "given", "pca", "pullback"]
