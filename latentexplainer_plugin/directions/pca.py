"""PCA directions: principal components of the activations at a site, over samples and timesteps.

1. Draw ``n_samples`` noises x_T from ``seed`` and sample them; ``hooks.capture`` records h at the
   site on every step of the edit window (and passes each capture to the capture hook).
2. Centre h per step (subtract the mean over samples at that step), so the components describe how
   samples differ, not how h drifts from step to step.
3. Stack (samples x steps, features) and take the top right-singular vectors (float64 SVD).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Directions


def principal_directions(h: torch.Tensor, n_directions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``n_directions`` principal axes of ``h`` (n, steps, *shape), centred per step.

    Returns (vectors (K, *shape), explained variance ratios (K,)). Signs are fixed so that the
    largest-magnitude coordinate of each vector is positive.
    """
    if h.ndim < 3:
        raise ValueError(f"h must be (n_samples, n_steps, *shape), got shape {tuple(h.shape)}")
    n, steps = h.shape[:2]
    x = h.double().flatten(2)
    x = (x - x.mean(dim=0, keepdim=True)).reshape(n * steps, -1)
    limit = min(n * steps - steps, x.shape[1])  # centring per step removes one degree of freedom per step
    if not 1 <= n_directions <= limit:
        raise ValueError(
            f"n_directions={n_directions} is out of range: {n} samples x {steps} steps of {x.shape[1]} features "
            f"give at most {limit} principal directions; draw more samples"
        )
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    vectors = vh[:n_directions]
    peak = vectors.abs().argmax(dim=1)
    vectors = vectors * vectors.gather(1, peak[:, None]).sign()
    ratio = (s[:n_directions] ** 2) / (s ** 2).sum()
    return vectors.float().view(n_directions, *h.shape[2:]), ratio.float()


def pca(adapter: Any, n_directions: int = 8, n_samples: int = 32, seed: int = 0) -> Directions:
    """Principal components of h at ``adapter.site`` over ``n_samples`` samples and the edit window's steps."""
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be an integer >= 1, got {n_directions!r}")
    if not isinstance(n_samples, int) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}")
    h = adapter.capture_h(adapter.sample_bases(n_samples, seed))
    vectors, ratio = principal_directions(h, n_directions)
    timesteps = adapter.timesteps[adapter.edit_calls]
    return Directions(vectors, {
        "finder": "pca", "model": adapter.model_id, "site": str(adapter.site), "timestep": timesteps,
        "n_samples": n_samples, "seed": seed, "explained_variance_ratio": [round(float(r), 6) for r in ratio],
        "centred": "per step",
    })
