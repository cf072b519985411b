"""Adapters: a model family's recipe from (site, latent or direction, strengths) to images."""

from .base import DEFAULT_STRENGTHS, Adapter, check_strengths
from .vae import VAEAdapter, load_vae

__all__ = ["DEFAULT_STRENGTHS", "Adapter", "VAEAdapter", "check_strengths", "load_vae"]
