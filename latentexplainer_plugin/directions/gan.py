"""GAN direction finders in the latent space of a generator (``GeneratorAdapter``).

SeFa (Shen & Zhou 2021, "Closed-Form Factorization of Latent Semantics in GANs", eq. (5)): the
first layer that reads z projects it, y = A z + b; the directions n that move y most, maximising
||A n||^2 with ||n|| = 1, are the top eigenvectors of A^T A. No sampling at all.

GANSpace (Haerkoenen et al. 2020, "GANSpace: Discovering Interpretable GAN Controls", sec. 2):
1. draw N latents z ~ N(0, I) and record the activations y of an early layer;
2. PCA of y: components U_k and coordinates x_k = U_k . (y - mean y);
3. transfer each component to latent space by linear regression of z on its coordinate,
   v_k = sum_i z_i x_ik / sum_i x_ik^2 (the paper's regression for generators without a W space),
   normalised. Without any layer, the images themselves are the activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hooks import capture, resolve_module
from ..types import Site
from .base import Directions


def _latent_layer(adapter: Any, layer: str | None) -> tuple[str, nn.Module]:
    """The first Linear / ConvTranspose2d / Conv2d of the generator (or the module at ``layer``)."""
    driver = adapter.driver
    if layer is not None:
        return layer, resolve_module(driver, layer)
    for name, module in driver.named_modules():
        if isinstance(module, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d)):
            return name, module
    raise ValueError(f"{type(adapter.model).__name__} has no Linear or convolution layer: SeFa factorises the weight "
                     "of the layer that reads z; use ganspace (PCA of the generated images) or a directions file")


def _dim(adapter: Any) -> int:
    """The size of the space directions live in: ``direction_dim`` when the adapter has one (W in W+), else the latent size."""
    return int(getattr(adapter, "direction_dim", adapter.latent_dim))


def _check(adapter: Any, n_directions: int) -> None:
    if not hasattr(adapter, "driver") or not hasattr(adapter, "latent_dim"):
        raise TypeError(f"GAN direction finders work on a generator adapter, got {type(adapter).__name__}")
    if not isinstance(n_directions, int) or isinstance(n_directions, bool) or not 1 <= n_directions <= _dim(adapter):
        raise ValueError(f"n_directions must be an integer in [1, {_dim(adapter)}] (the latent size), got {n_directions!r}")


def sefa(adapter: Any, n_directions: int = 8, seed: int = 0, layer: str | None = None) -> Directions:
    """Top eigenvectors of A^T A for the weight A of the first layer reading z (closed form)."""
    n_directions = min(n_directions, _dim(adapter)) if isinstance(n_directions, int) else n_directions
    _check(adapter, n_directions)
    name, module = _latent_layer(adapter, layer)
    weight = module.weight.detach().double()
    d = _dim(adapter)
    if isinstance(module, nn.ConvTranspose2d):
        a_t = weight.reshape(weight.shape[0], -1)  # (in = D, out * kh * kw): rows are z's coordinates
    else:
        a_t = weight.reshape(weight.shape[0], -1).T  # Linear / Conv2d: (out, in * ...) -> (in..., out)
    if a_t.shape[0] != d:
        raise ValueError(f"layer {name!r} reads {a_t.shape[0]} values, but the latent has {d}: pass layer= the layer that reads z")
    values, vectors = torch.linalg.eigh(a_t @ a_t.T)  # ascending
    order = torch.argsort(values, descending=True)[:n_directions]
    vecs = vectors[:, order].T.float()
    peak = vecs.abs().argmax(dim=1)
    vecs = vecs * vecs.gather(1, peak[:, None]).sign()  # a fixed sign: largest coordinate positive
    total = float(values.clamp(min=0).sum())
    return Directions(vecs, {"finder": "sefa", "layer": name, "eigenvalues": [round(float(values[i]), 6) for i in order],
                             "explained": [round(float(values[i]) / total, 6) if total > 0 else 0.0 for i in order]})


def ganspace(adapter: Any, n_directions: int = 8, seed: int = 0, n_samples: int = 2000,
             site: Site | str | None = None) -> Directions:
    """PCA of an early layer's activations over ``n_samples`` latents, regressed back onto z."""
    n_directions = min(n_directions, _dim(adapter)) if isinstance(n_directions, int) else n_directions
    _check(adapter, n_directions)
    if not isinstance(n_samples, int) or n_samples <= n_directions:
        raise ValueError(f"n_samples must be an integer > n_directions ({n_directions}), got {n_samples!r}")
    if site is None:  # the first layer's output; the images themselves for a generator without layers
        try:
            site = Site(_latent_layer(adapter, None)[0], "output")
        except ValueError:
            site = Site("", "output")
    elif isinstance(site, str):
        site = Site.parse(site)
    z = adapter.sample_bases(n_samples, seed=seed)
    with torch.no_grad():
        y = torch.cat([capture(adapter.driver, site, z[i:i + adapter.max_batch])[0].flatten(1)
                       for i in range(0, n_samples, adapter.max_batch)]).double()
    y = y - y.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(y, full_matrices=False)
    k = min(n_directions, vh.shape[0])
    coords = y @ vh[:k].T  # (N, k): coordinate of each sample along each component
    zc = z.double() - z.double().mean(dim=0, keepdim=True)
    vecs = (zc.T @ coords / (coords ** 2).sum(dim=0, keepdim=True)).T  # regression of z on each coordinate
    vecs = vecs / vecs.norm(dim=1, keepdim=True).clamp(min=1e-12)
    peak = vecs.abs().argmax(dim=1)
    vecs = (vecs * vecs.gather(1, peak[:, None]).sign()).float()
    ratio = (s[:k] ** 2) / (s ** 2).sum()
    return Directions(vecs, {"finder": "ganspace", "site": str(site), "n_samples": n_samples, "seed": seed,
                             "explained": [round(float(r), 6) for r in ratio]})
