"""Where directions come from: latent axes, user vectors, PCA, Jacobian pull-back, label-conditional means,
and for GANs SeFa and GANSpace."""

from .axes import axes, given
from .base import Directions
from .conditional import conditional
from .gan import ganspace, sefa
from .pca import pca
from .pullback import PullbackDirections, pullback

__all__ = ["Directions", "PullbackDirections", "axes", "conditional", "ganspace", "given", "pca", "pullback", "sefa"]
