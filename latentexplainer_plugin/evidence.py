"""Image-side evidence: does a traversal change the images more than noise does, and consistently?

Before any answer about a latent is trusted, the traversal itself has to show (1) a visible change
and (2) the same change in every strip (every base latent, every row). Both are measured on the
images alone (numpy/torch, no model calls):

- ``change``: per strip, the mean absolute difference between the last and the first frame, on
  frames average-pooled to about 16-32 pixels a side (pixel noise averages out). The median over
  strips is compared with an absolute floor (``MIN_CHANGE``) and with ``between``, the mean
  absolute difference between the images of different bases at the middle strength: the natural
  variation of the model's images. ``ratio = change / between``.
- ``consistency``: the mean pairwise cosine, over all pairs of strips, of a change descriptor
  (last frame minus first frame). Two descriptors are compared and the larger agreement counts:
  ``descriptor_agreement`` uses global properties (channel means, border (background) colour,
  object colour, object centroid, object size and spread), so "the object moves right" agrees
  across bases whatever the object's position; ``map_agreement`` uses the pooled signed change
  maps, so "this region gets brighter" agrees when the images are aligned (faces). Independent
  noise gives cosines near 0, a shared change near 1.

A traversal is ``consistent`` when its change is visible (floor and ratio) and its consistency
reaches ``MIN_CONSISTENCY`` with a z-score of at least ``MIN_SIGNIFICANCE`` against chance
(so at least ``MIN_STRIPS`` strips are needed). Images with NaN or inf raise
:class:`NonFiniteImagesError`: a failure of the model or of the strengths, never "no visible change".

The thresholds below were measured with ``python benchmarks/bench_evidence.py`` (docs/benchmarks.md,
section "Image evidence"): the demo VAE's 5 active latents, its 5 collapsed ones, a random-weight
copy of the demo VAE, and random-weight UNets at 16, 32 and 64 px with PCA directions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .types import Traversal
from .errors import NonFiniteImagesError  # noqa: F401 (re-exported)

# Thresholds, measured with benchmarks/bench_evidence.py (docs/benchmarks.md, "Image evidence"):
# Mean |last - first| per pixel (pooled, [0, 1] scale) below which nothing visibly changes: 2/255,
# the floor the heat maps use too. Measured: demo collapsed latents 0.0021-0.0035, random-weight
# demo VAE < 0.0001 (a flat image), random UNet 64 px 0.005-0.007; demo active latents 0.078-0.45.
MIN_CHANGE = 2.0 / 255.0
# change / between-base variation below which the change is too small to be a property of the
# latent. Measured: demo collapsed latents 0.011-0.019, demo active latents 0.42-9.4 (random
# UNets 0.05-0.31: visible changes, which the agreement rejects).
MIN_RATIO = 0.05
# Mean pairwise cosine of the change descriptors at or above which the strips agree. Measured
# (5 bases): demo active latents 0.87-0.99 over 10 strips; random UNets 16/32/64 px at most 0.23;
# independent noise has expectation 0.
MIN_CONSISTENCY = 0.5
# z-score of that agreement against chance (random signs per strip) at or above which it counts.
# Measured: demo active latents z 6.6-6.7 (10 strips), random UNets at most 2.1 (5 strips). With 4
# strips a random 16 px UNet direction reached agreement 0.52 by chance (z 2.3; 0.14 with 8).
MIN_SIGNIFICANCE = 3.0
MIN_STRIPS = 5  # perfect agreement over n strips has z = sqrt(n(n-1)/2): 3.16 for 5, fewer never pass
POOL_TO = 16  # frames are average-pooled by max(1, side // POOL_TO) before the change is measured
_MIN_CONTRAST = 0.1  # colour distance from the background an object needs (as the offline explainer)


@dataclass
class Evidence:
    """What the traversal images show about one latent, before any answer is read.

    ``change``: median over strips of the mean |last - first| frame difference (pooled, [0, 1]).
    ``between``: mean |difference| between bases at the middle strength (None with one base).
    ``ratio``: change / between (None when ``between`` is None or ~0).
    ``consistency``: the larger of descriptor_agreement and map_agreement (None with a single
    strip); ``significance``: its z-score against chance agreement (sign flips).
    ``visible`` / ``consistent``: the verdicts; ``reason`` says why in words.
    ``strip_changes``: the change of every strip (base-major, then row) for plots.
    """

    change: float
    between: float | None
    ratio: float | None
    consistency: float | None
    significance: float | None
    descriptor_agreement: float | None
    map_agreement: float | None
    strips: int
    visible: bool
    consistent: bool
    reason: str
    strip_changes: list[float]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (floats rounded to 4 digits; None where not measurable)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 4) if math.isfinite(value) else None
        out["strip_changes"] = [round(v, 4) for v in self.strip_changes]
        return out


def check_finite(traversal: Traversal) -> None:
    """Raise :class:`NonFiniteImagesError` naming the latent, the strengths and the likely cause."""
    images = traversal.images
    finite = torch.isfinite(images)
    if bool(finite.all()):
        return
    bad_frames = (~finite).flatten(3).any(-1)  # (bases, rows, steps)
    steps = bad_frames.any(0).any(0).nonzero().flatten().tolist()
    strengths = [f"{float(traversal.strengths[s]):g}" for s in steps]
    raise NonFiniteImagesError(
        f"latent {traversal.latent_id}: {int(bad_frames.sum())} of {bad_frames.numel()} traversal images contain NaN or inf "
        f"(at strengths {', '.join(strengths)}); the model produced non-finite output: check its weights for NaN, or use "
        "smaller strengths"
    )


def _pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) averaged over k x k blocks, k = max(1, min(H, W) // POOL_TO)."""
    k = max(1, min(x.shape[-2:]) // POOL_TO)
    return F.avg_pool2d(x, k, k, ceil_mode=True) if k > 1 else x


def _descriptors(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, D) global properties, each on a [0, 1]-like scale.

    Channel means, background colour (median of the border pixels), object colour, object
    centroid (x, y as image fractions), sqrt of the object's area fraction and its spread (RMS
    distance from the centroid). The object is every pixel whose colour distance from the
    background exceeds half the image's largest distance (and ``_MIN_CONTRAST / 2``); an image
    with no such pixel has centroid 0.5, size 0, spread 0 and object colour = background colour.
    """
    n, c, h, w = images.shape
    means = images.mean(dim=(2, 3))
    border = torch.cat([images[:, :, 0, :], images[:, :, -1, :], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], dim=2)
    bg = border.median(dim=2).values
    dist = (images - bg[:, :, None, None]).pow(2).sum(1).sqrt()  # (N, H, W)
    peak = dist.flatten(1).amax(1)
    thr = torch.maximum(peak / 2, torch.full_like(peak, _MIN_CONTRAST / 2))
    mask = (dist > thr[:, None, None]) & (peak >= _MIN_CONTRAST)[:, None, None]
    m = mask.to(images.dtype)
    count = m.sum(dim=(1, 2))
    has = count > 0
    safe = count.clamp_min(1.0)
    xs = (torch.arange(w, dtype=images.dtype) + 0.5) / w
    ys = (torch.arange(h, dtype=images.dtype) + 0.5) / h
    cx = torch.where(has, (m.sum(1) * xs).sum(1) / safe, torch.full_like(count, 0.5))
    cy = torch.where(has, (m.sum(2) * ys).sum(1) / safe, torch.full_like(count, 0.5))
    d2 = (xs[None, None, :] - cx[:, None, None]) ** 2 + (ys[None, :, None] - cy[:, None, None]) ** 2
    spread = ((m * d2).sum(dim=(1, 2)) / safe).sqrt()
    size = (count / (h * w)).sqrt()
    colour = torch.where(has[:, None], (images * m[:, None]).sum(dim=(2, 3)) / safe[:, None], bg)
    return torch.cat([means, bg, colour, cx[:, None], cy[:, None], size[:, None], spread[:, None]], dim=1)


def _agreement(v: torch.Tensor) -> tuple[float, float]:
    """Mean cosine over all pairs of rows of ``v`` (N >= 2, D) and its z-score under sign flips.

    A zero row counts as cosine 0. The null hypothesis "the strips change in no common direction"
    makes every strip's sign arbitrary; flipping signs at random, the mean of the pair cosines c_ij
    has mean 0 and variance sum_{i<j} c_ij^2 / P^2 (P pairs), so z = mean / sqrt(that). Perfect
    agreement gives z = sqrt(P): 1 for 2 strips, 3.16 for 5, 6.7 for 10.
    """
    norm = v.norm(dim=1)
    unit = v / norm.clamp_min(1e-12)[:, None]
    unit = torch.where((norm > 1e-9)[:, None], unit, torch.zeros_like(unit))
    iu = torch.triu_indices(len(v), len(v), offset=1)
    pairs = (unit[iu[0]] * unit[iu[1]]).sum(1).clamp(-1.0, 1.0).double()
    mean = float(pairs.mean())
    sd = float(pairs.pow(2).sum().sqrt()) / len(pairs)
    return mean, (mean / sd if sd > 1e-12 else 0.0)


def traversal_evidence(traversal: Traversal) -> Evidence:
    """Measure how much, and how consistently, ``traversal`` changes its images (see the module doc).

    Raises :class:`NonFiniteImagesError` when an image has NaN or inf values.
    """
    check_finite(traversal)
    x = traversal.images.detach().float().cpu()
    b, r, s, c, h, w = x.shape
    first, last = x[:, :, 0].reshape(b * r, c, h, w), x[:, :, -1].reshape(b * r, c, h, w)
    pf, pl = _pool(first), _pool(last)
    strip_changes = (pl - pf).abs().mean(dim=(1, 2, 3))
    change = float(strip_changes.median())
    between = None
    if b > 1:
        mid = _pool(x[:, 0, s // 2])
        iu = torch.triu_indices(b, b, offset=1)
        between = float((mid[iu[0]] - mid[iu[1]]).abs().mean(dim=(1, 2, 3)).mean())
    ratio = change / between if between is not None and between > 1e-6 else None
    n = b * r
    desc_agree = map_agree = consistency = significance = None
    if n > 1:
        desc_agree, desc_z = _agreement(_descriptors(last) - _descriptors(first))
        map_agree, map_z = _agreement((pl - pf).flatten(1))
        consistency, significance = max((desc_agree, desc_z), (map_agree, map_z))
    visible = s > 1 and change >= MIN_CHANGE and (ratio is None or ratio >= MIN_RATIO)
    if s < 2:
        reason = "a single strength: there is no change to measure"
    elif change < MIN_CHANGE:
        reason = f"no visible change: the images change by {change:.4f} per pixel (< {MIN_CHANGE:.4f})"
    elif ratio is not None and ratio < MIN_RATIO:
        reason = (f"no visible change: the change ({change:.4f}) is {ratio:.3f} of the variation between bases "
                  f"({between:.4f}; < {MIN_RATIO})")
    elif consistency is None:
        reason = (f"one strip only (1 base, 1 row): consistency across bases cannot be measured; use at least "
                  f"{MIN_STRIPS} strips (bases x rows)")
    elif consistency < MIN_CONSISTENCY:
        reason = (f"inconsistent: the change differs between bases and rows (agreement {consistency:.2f} "
                  f"< {MIN_CONSISTENCY})")
    elif significance < MIN_SIGNIFICANCE:
        reason = (f"too few strips to tell: agreement {consistency:.2f} across {n} strips could be chance "
                  f"(z {significance:.1f} < {MIN_SIGNIFICANCE}); use at least {MIN_STRIPS} strips (bases x rows)")
    else:
        reason = f"consistent change (size {change:.3f}, agreement {consistency:.2f} across {n} strips)"
    consistent = (visible and consistency is not None and consistency >= MIN_CONSISTENCY
                  and significance >= MIN_SIGNIFICANCE)
    return Evidence(change=change, between=between, ratio=ratio, consistency=consistency,
                    significance=significance, descriptor_agreement=desc_agree, map_agreement=map_agree, strips=n,
                    visible=visible,
                    consistent=consistent, reason=reason, strip_changes=[float(v) for v in strip_changes])


__all__ = ["Evidence", "NonFiniteImagesError", "traversal_evidence", "check_finite",
           "MIN_CHANGE", "MIN_RATIO", "MIN_CONSISTENCY", "MIN_SIGNIFICANCE", "MIN_STRIPS"]
