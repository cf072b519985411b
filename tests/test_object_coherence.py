"""An "object" must be spatially coherent: scattered foreground pixels (a noise texture) are no object.

The truth check behind it: a random-weight MLP generator draws each pixel as a fixed random function of
the latent. Moving a latent shifts every base's texture the same way, so the image evidence is
consistent; before this check the offline explainer segmented the scattered pixels as "the object" and
named its colour change as a clear explanation. Nothing in such an image is an object.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentexplainer_plugin import LatentExplainer
from latentexplainer_plugin.adapters.generator import GeneratorAdapter
from latentexplainer_plugin.backends.measure import MIN_COHERENCE, coherence, foreground


def _hand_coherence(mask: torch.Tensor) -> float:
    """The same quantity counted pixel by pixel in plain Python (8 neighbours)."""
    h, w = mask.shape
    inside = hits = 0
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if (di or dj) and 0 <= i + di < h and 0 <= j + dj < w:
                        inside += 1
                        hits += int(mask[i + di, j + dj])
    p = float(mask.float().mean())
    return (hits / inside - p) / (1 - p)


def test_coherence_matches_a_pixel_by_pixel_count():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(5, 20, 24, dtype=torch.bool)
    masks[0, 4:6, 7:9] = True  # 2x2 square: 12 of 32 neighbour slots are in -> 0.375 before the chance term
    masks[1, 3, 2:20] = True  # a horizontal line
    masks[2] = torch.rand(20, 24, generator=g) < 0.4  # scattered pixels
    yy, xx = torch.meshgrid(torch.arange(20), torch.arange(24), indexing="ij")
    masks[3] = (yy - 10) ** 2 + (xx - 12) ** 2 <= 25  # a disc
    masks[4, 0, 0] = True  # one corner pixel
    got = coherence(masks)
    for k in range(5):
        assert float(got[k]) == pytest.approx(_hand_coherence(masks[k]), abs=1e-6)
    assert float(got[0]) == pytest.approx((12 / 32 - 4 / 480) / (1 - 4 / 480), abs=1e-6)
    assert float(got[3]) > 0.75 and abs(float(got[2])) < 0.1
    assert float(coherence(torch.zeros(1, 8, 8, dtype=torch.bool))[0]) == 0.0


def test_a_noise_texture_has_no_object_but_a_shape_on_noise_does():
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(1, 3, 32, 32, generator=g)
    mask, _ = foreground(noise)
    assert not mask.any()
    # the same noise, faint, under a bright square: the square is the object
    img = 0.3 + 0.1 * noise
    img[:, :, 10:18, 12:20] = torch.tensor([0.9, 0.2, 0.2])[:, None, None]
    mask, _ = foreground(img)
    assert mask[0, 10:18, 12:20].all() and int(mask.sum()) == 64
    assert float(coherence(mask)[0]) >= MIN_COHERENCE


class _PixelNoiseGenerator(nn.Module):
    """Every pixel a fixed random (seeded) function of z: sigmoid of a random linear map, 16 x 16 RGB."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3 * 16 * 16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(z)).view(len(z), 3, 16, 16)


def test_random_pixel_generator_gets_no_clear_explanation():
    adapter = GeneratorAdapter(_PixelNoiseGenerator())
    results = LatentExplainer(adapter, samples=5, similarity="bow").attribute(target=[0, 1, 2, 3])
    # the images do change consistently (each pixel is the same function of z in every base) ...
    assert sum(r.evidence.consistent for r in results) >= 2
    # ... but no answer finds an object in a noise texture, so nothing is clear
    assert [r.clear for r in results] == [False] * 4
    for r in results:
        assert all(not resp.meta["object"] for resp in r.responses)
