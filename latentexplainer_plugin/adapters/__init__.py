"""Adapters: a model family's recipe from (site, latent or direction, strengths) to images."""

from .base import DEFAULT_STRENGTHS, Adapter, check_strengths
from .diffusion import DDPMAdapter, load_ddpm
from .generator import GeneratorAdapter, load_generator
from .stable_diffusion import StableDiffusionAdapter, load_stable_diffusion
from .vae import VAEAdapter, load_vae

__all__ = ["DEFAULT_STRENGTHS", "Adapter", "DDPMAdapter", "GeneratorAdapter", "StableDiffusionAdapter", "VAEAdapter",
           "check_strengths", "load_ddpm", "load_generator", "load_stable_diffusion", "load_vae"]
