"""Which factor each latent captures: kept where the evaluation code looks for it (the code lives in
:mod:`latentexplainer_plugin.models.factors`, next to the latent statistics that use it)."""

from ..models.factors import *  # noqa: F401,F403
from ..models.factors import FactorMatch, captured_factors, discretize, histogram_discretize  # noqa: F401
