"""Generic, batched image measurements used by the offline explainer.

Nothing here knows which model drew the images: every image is read as "an optional object on a
background". The background colour is the median of the border pixels; the object (foreground) is
every pixel whose colour is far enough from it (Otsu threshold on the colour-distance map, with a
contrast floor so a plain image has an empty mask). Properties of the object and the background are
measured per image, and :func:`strip_effects` turns the properties of a strip of images (one latent
moving) into signed, unit-normalised changes.

Conventions: images are ``(N, C, H, W)`` floats in [0, 1] with ``C`` 1 or 3 (a 4th alpha channel is
dropped), ``H, W >= 16``. ``x`` grows left to right, ``y`` top to bottom, and a positive rotation
turns the object clockwise as seen on screen (image y axis points down).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Properties measured per image (``measure``); NaN where undefined (no object, no colour, ...).
PROPERTIES = ("x", "y", "area", "hue", "background", "compactness", "intensity")
# Signed effects returned by ``strip_effects`` (plus the unsigned ``pixel_change``).
EFFECTS = ("x", "y", "area", "rotation", "hue", "background", "compactness", "intensity")

# Normalisation of each effect: an effect of 1.0 is a large, obvious change. The scales are chosen
# so that sweeping one factor of a typical "object on a background" dataset over its whole range
# gives an effect near 1 whatever the factor (half the image width of travel, an area e-fold,
# a quarter turn, half the hue circle, half the brightness range), which makes the effects of
# different properties comparable and lets one threshold apply to all of them.
SCALES: dict[str, float] = {
    "x": 0.5,  # centroid shift, in image widths: 1.0 = half the image width
    "y": 0.5,  # centroid shift, in image heights: 1.0 = half the image height
    "area": 1.0,  # natural log of the area ratio: 1.0 = the area grows e-fold (x2.72)
    "rotation": 90.0,  # degrees: 1.0 = a quarter turn
    "hue": 0.5,  # turns of the hue circle (unwrapped): 1.0 = half the circle (e.g. red -> cyan)
    "background": 0.5,  # mean background brightness: 1.0 = half the brightness range
    "compactness": 1.0,  # natural log of the compactness ratio: 1.0 = e-fold rounder
    "intensity": 0.5,  # mean image brightness: 1.0 = half the brightness range
}

MIN_CONTRAST = 0.1  # colour distance an object must reach to be found at all (plain image -> empty)
MIN_SATURATION = 0.15  # mean saturation below which an object has no defined hue
MIN_OBJECT_PIXELS = 4  # fewer foreground pixels than this: no object
# Spatial coherence (see ``coherence``) below which a foreground is scattered pixels, not an object.
# Measured (``foreground`` masks, 300 images each): shapes/shapes2/shapes3 data and demo VAE decodes
# 0.77-0.95; a 2x2 object 0.37, a one-pixel line (straight or diagonal) about 0.2; per-pixel noise
# textures (a random-weight MLP generator, 16 px, 200 images) -0.07 to 0.04 (95th percentile 0.036).
MIN_COHERENCE = 0.15


def _check(images: Tensor) -> Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c == 4:
        images, c = images[:, :3], 3
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (or RGBA), got {c}")
    if h < 16 or w < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {h}x{w}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images.detach().float().clamp(0.0, 1.0)


def rgb_to_hsv(rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RGB ``(N, 3, H, W)`` in [0, 1] -> hue (turns, [0, 1)), saturation, value, each ``(N, H, W)``."""
    r, g, b = rgb.unbind(1)
    mx, argmx = rgb.max(1)
    mn = rgb.min(1).values
    delta = mx - mn
    safe = torch.where(delta > 1e-8, delta, torch.ones_like(delta))
    h = torch.where(argmx == 0, ((g - b) / safe) % 6.0, torch.where(argmx == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 1e-8, h / 6.0, torch.zeros_like(h)) % 1.0
    s = torch.where(mx > 1e-8, delta / torch.where(mx > 1e-8, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    return h, s, mx


def background_colour(images: Tensor) -> Tensor:
    """Median colour of the border pixels of every image: ``(N, C)``."""
    images = _check(images)
    top, bottom = images[:, :, 0, :], images[:, :, -1, :]
    left, right = images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]
    border = torch.cat([top, bottom, left, right], dim=2)  # (N, C, P)
    return border.median(dim=2).values


def _otsu(values: Tensor, bins: int = 64) -> Tensor:
    """Otsu threshold of every row of ``values`` (N, P), values >= 0."""
    n = values.shape[0]
    vmax = values.max(dim=1, keepdim=True).values.clamp_min(1e-6)
    idx = (values / vmax * bins).long().clamp(0, bins - 1)
    counts = torch.zeros(n, bins, dtype=values.dtype, device=values.device).scatter_add_(1, idx, torch.ones_like(values))
    p = counts / counts.sum(1, keepdim=True)
    centres = (torch.arange(bins, dtype=values.dtype, device=values.device) + 0.5) / bins
    w0 = p.cumsum(1)
    m0 = (p * centres).cumsum(1)
    mt = m0[:, -1:]
    between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between[:, -1] = -1.0
    k = between.argmax(1)
    return (k.to(values.dtype) + 1.0) / bins * vmax.squeeze(1)


def coherence(mask: Tensor) -> Tensor:
    """Spatial coherence of binary masks ``(N, H, W)``: how much more often a foreground pixel's
    8-neighbours are foreground than chance (the foreground fraction ``p``), as
    ``(P(neighbour in | pixel in) - p) / (1 - p)``. About 0.8-0.95 for a blob, 0.37 for a 2x2
    square, about 0.2 for a one-pixel line in any direction, about 0 for scattered pixels; 0 for
    an empty mask. All 8 neighbours count, so the measure treats every direction alike."""
    m = mask.float()
    both = m.new_zeros(m.shape[0])
    slots = m.new_zeros(m.shape[0])
    for a, b in ((m[:, :, 1:], m[:, :, :-1]), (m[:, 1:, :], m[:, :-1, :]),
                 (m[:, 1:, 1:], m[:, :-1, :-1]), (m[:, 1:, :-1], m[:, :-1, 1:])):
        both += (a * b).sum(dim=(1, 2))
        slots += (a + b).sum(dim=(1, 2))
    p = m.mean(dim=(1, 2))
    given = 2.0 * both / slots.clamp_min(1.0)
    return torch.where(slots > 0, (given - p) / (1.0 - p).clamp_min(1e-6), torch.zeros_like(p))


def foreground(images: Tensor, min_contrast: float = MIN_CONTRAST, min_coherence: float = MIN_COHERENCE) -> tuple[Tensor, Tensor]:
    """Foreground masks ``(N, H, W)`` (bool) and background colours ``(N, C)``.

    The colour distance to the background is thresholded with Otsu's method; an image whose
    (3x3-smoothed) peak distance stays below ``min_contrast`` has an empty mask, and no pixel
    closer than ``min_contrast / 2`` to the background is ever foreground (noise stays out).
    A mask whose :func:`coherence` stays below ``min_coherence`` is emptied too: scattered pixels
    (a noise texture) are not an object, so nothing is said about "the object" of such an image.
    """
    images = _check(images)
    bg = background_colour(images)
    dist = (images - bg[:, :, None, None]).pow(2).sum(1).sqrt()  # (N, H, W)
    n, h, w = dist.shape
    contrast = F.avg_pool2d(dist[:, None], 3, 1, 1).amax(dim=(1, 2, 3))
    thr = torch.maximum(_otsu(dist.reshape(n, -1)), torch.full_like(contrast, min_contrast / 2))
    mask = dist > thr[:, None, None]
    mask &= (contrast >= min_contrast)[:, None, None]
    mask &= (coherence(mask) >= min_coherence)[:, None, None]
    return mask, bg


def _perimeter(mask: Tensor) -> Tensor:
    """Boundary length of binary masks ``(N, H, W)`` in pixels: summed Sobel gradient magnitude of
    the mask (isotropic: a disc, a square and a 45-degree square all measure within ~3 %)."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=mask.device) / 8.0
    weight = torch.stack([k, k.t()])[:, None]
    g = F.conv2d(F.pad(mask[:, None].float(), (1, 1, 1, 1)), weight)
    return g.pow(2).sum(1).sqrt().sum(dim=(1, 2))


def measure(images: Tensor, min_contrast: float = MIN_CONTRAST, masks: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-image properties, each a ``(N,)`` tensor (NaN where undefined):

    ``x``, ``y``: foreground centroid in [0, 1] (left->right, top->bottom); ``area``: foreground
    fraction; ``hue``: saturation-weighted circular mean hue of the foreground (turns, [0, 1));
    ``background``: mean brightness of the background pixels; ``compactness``:
    4*pi*area/perimeter^2 (about 1 for a disc, 0.8 a square, 0.3 an 8:1 bar); ``intensity``: mean
    brightness of the whole image. Brightness is the mean over channels.
    """
    images = _check(images)
    mask, _ = masks if masks is not None else foreground(images, min_contrast)
    n, c, h, w = images.shape
    m = mask.float()
    count = m.sum(dim=(1, 2))
    has = count >= MIN_OBJECT_PIXELS
    nan = torch.full_like(count, float("nan"))
    safe = count.clamp_min(1.0)
    xs = (torch.arange(w, dtype=m.dtype) + 0.5) / w
    ys = (torch.arange(h, dtype=m.dtype) + 0.5) / h
    x = (m.sum(1) * xs).sum(1) / safe
    y = (m.sum(2) * ys).sum(1) / safe
    area = count / (h * w)
    bright = images.mean(1)  # (N, H, W)
    nbg = (1.0 - m).sum(dim=(1, 2))
    background = ((1.0 - m) * bright).sum(dim=(1, 2)) / nbg.clamp_min(1.0)
    background = torch.where(nbg >= 1, background, nan)
    compact = 4.0 * math.pi * count / _perimeter(mask).clamp_min(1e-6) ** 2
    if c == 3:
        hue, sat, _ = rgb_to_hsv(images)
        wgt = sat * m
        ang = 2.0 * math.pi * hue
        cs, sn = (wgt * ang.cos()).sum(dim=(1, 2)), (wgt * ang.sin()).sum(dim=(1, 2))
        mean_sat = wgt.sum(dim=(1, 2)) / safe
        hue_mean = (torch.atan2(sn, cs) / (2.0 * math.pi)) % 1.0
        hue_mean = torch.where(has & (mean_sat >= MIN_SATURATION), hue_mean, nan)
    else:
        hue_mean = nan.clone()
    return {
        "x": torch.where(has, x, nan),
        "y": torch.where(has, y, nan),
        "area": torch.where(has, area, nan),
        "hue": hue_mean,
        "background": background,
        "compactness": torch.where(has, compact, nan),
        "intensity": bright.mean(dim=(1, 2)),
    }


def _canonical_grid(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centroid (N, 2) in pixels (x, y), scale sqrt(area) in pixels (N,), and reach (N,): the
    farthest foreground pixel from the centroid in units of the scale."""
    n, h, w = mask.shape
    m = mask.float()
    count = m.sum(dim=(1, 2)).clamp_min(1.0)
    px = torch.arange(w, dtype=m.dtype)
    py = torch.arange(h, dtype=m.dtype)
    cx = (m.sum(1) * px).sum(1) / count
    cy = (m.sum(2) * py).sum(1) / count
    scale = count.sqrt()
    d2 = (px[None, None, :] - cx[:, None, None]) ** 2 + (py[None, :, None] - cy[:, None, None]) ** 2
    reach = (d2 * m).amax(dim=(1, 2)).sqrt() / scale
    return torch.stack([cx, cy], 1), scale, reach


def relative_rotation(
    masks_a: Tensor,
    masks_b: Tensor,
    max_angle: float = 45.0,
    step: float = 3.0,
    grid: int = 48,
    min_spread: float = 0.03,
    min_iou: float = 0.4,
) -> Tensor:
    """Rotation in degrees (positive = clockwise on screen) that turns each mask of ``masks_a``
    into the matching mask of ``masks_b``; both ``(N, H, W)``.

    Each mask is centred at its centroid and scaled by sqrt(area) (so moving and growing do not
    count), then ``b`` is sampled at every candidate angle in [-max_angle, max_angle] and the angle
    with the best IoU against ``a`` wins (refined by a parabola through its neighbours). Returns 0
    where the shape is rotation-invariant (best and worst IoU within ``min_spread``), where the
    shapes do not match at any angle (best IoU < ``min_iou``), or where either mask is empty.
    """
    if masks_a.shape != masks_b.shape or masks_a.ndim != 3:
        raise ValueError(f"masks must both be (N, H, W), got {tuple(masks_a.shape)} and {tuple(masks_b.shape)}")
    n, h, w = masks_a.shape
    if n == 0:
        return torch.zeros(0)
    ca, sa, ra = _canonical_grid(masks_a)
    cb, sb, rb = _canonical_grid(masks_b)
    extent = (torch.maximum(ra, rb) * 1.05).clamp(1.0, 6.0)  # (N,)
    lin = torch.linspace(-1.0, 1.0, grid)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    p = torch.stack([gx, gy], -1)[None] * extent[:, None, None, None]  # (N, G, G, 2) canonical units
    angles = torch.arange(-max_angle, max_angle + 1e-6, step)
    t = torch.deg2rad(angles)
    cos, sin = t.cos(), t.sin()
    size = torch.tensor([w, h], dtype=torch.float32)

    def to_norm(q: Tensor) -> Tensor:  # pixel-index coordinates -> grid_sample coordinates
        return (2.0 * q + 1.0) / size - 1.0

    qa = ca[:, None, None, :] + sa[:, None, None, None] * p
    sample_a = F.grid_sample(masks_a[:, None].float(), to_norm(qa), mode="bilinear", padding_mode="zeros", align_corners=False)
    # Rotate canonical points by every angle: (N, A, G, G, 2); x' = c x - s y, y' = s x + c y.
    px_, py_ = p[..., 0][:, None], p[..., 1][:, None]
    rx = cos[None, :, None, None] * px_ - sin[None, :, None, None] * py_
    ry = sin[None, :, None, None] * px_ + cos[None, :, None, None] * py_
    qb = cb[:, None, None, None, :] + sb[:, None, None, None, None] * torch.stack([rx, ry], -1)
    na = len(angles)
    src = masks_b[:, None].float().repeat_interleave(na, 0)  # (N*A, 1, H, W)
    sample_b = F.grid_sample(src, to_norm(qb).reshape(n * na, grid, grid, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
    sample_b = sample_b.reshape(n, na, grid, grid)
    a = sample_a.reshape(n, 1, grid, grid)
    inter = torch.minimum(a, sample_b).sum(dim=(2, 3))
    union = torch.maximum(a, sample_b).sum(dim=(2, 3)).clamp_min(1e-6)
    iou = inter / union  # (N, A)
    best_iou, best = iou.max(1)
    lo = iou.gather(1, (best - 1).clamp(0, na - 1)[:, None]).squeeze(1)
    hi = iou.gather(1, (best + 1).clamp(0, na - 1)[:, None]).squeeze(1)
    denom = lo - 2 * best_iou + hi
    inner = (best > 0) & (best < na - 1) & (denom < -1e-9)
    offset = torch.where(inner, 0.5 * (lo - hi) / torch.where(inner, denom, -torch.ones_like(denom)), torch.zeros_like(denom))
    angle = angles[best] + offset.clamp(-0.5, 0.5) * step
    spread = best_iou - iou.min(1).values
    valid = (spread >= min_spread) & (best_iou >= min_iou)
    valid &= (masks_a.flatten(1).sum(1) >= MIN_OBJECT_PIXELS) & (masks_b.flatten(1).sum(1) >= MIN_OBJECT_PIXELS)
    return torch.where(valid, angle, torch.zeros_like(angle))


def theil_sen_change(values: Tensor) -> float:
    """Total change along a sequence: the median of all pairwise slopes (Theil-Sen, robust to one
    bad frame) times the sequence length minus one. NaN entries are skipped; 0 if < 2 remain."""
    s = values.shape[0]
    idx = torch.arange(s, dtype=torch.float32)
    ok = ~torch.isnan(values)
    if int(ok.sum()) < 2:
        return 0.0
    v, i = values[ok].float(), idx[ok]
    iu = torch.triu_indices(len(v), len(v), offset=1)
    slopes = (v[iu[1]] - v[iu[0]]) / (i[iu[1]] - i[iu[0]])
    return float(slopes.median()) * (s - 1)


def _unwrap_hue(hue: Tensor) -> Tensor:
    """Make a hue sequence (turns) continuous: consecutive valid values differ by less than half a turn."""
    out = hue.clone()
    prev = None
    for k in range(len(hue)):
        if torch.isnan(hue[k]):
            continue
        if prev is not None:
            d = (hue[k] - out[prev] + 0.5) % 1.0 - 0.5
            out[k] = out[prev] + d
        prev = k
    return out


def strip_measurements(strip: Tensor, min_contrast: float = MIN_CONTRAST, **rotation_kwargs) -> dict[str, Tensor]:
    """Per-frame properties of a strip ``(S, C, H, W)``: everything of :func:`measure`, with ``hue``
    unwrapped along the strip, plus ``rotation`` (cumulative degrees from the first frame, summed
    over consecutive-frame alignments), ``pixel_change`` (per consecutive pair, mean absolute
    difference of 4x4-pooled frames, so pixel noise barely counts) and ``has_object`` (bool)."""
    strip = _check(strip)
    masks, bg = foreground(strip, min_contrast)
    props = measure(strip, min_contrast, masks=(masks, bg))
    props["hue"] = _unwrap_hue(props["hue"])
    if strip.shape[0] > 1:
        steps = relative_rotation(masks[:-1], masks[1:], **rotation_kwargs)
        props["rotation"] = torch.cat([torch.zeros(1), steps.cumsum(0)])
        pooled = F.avg_pool2d(strip, 4, 4, ceil_mode=True)
        props["pixel_change"] = (pooled[1:] - pooled[:-1]).abs().mean(dim=(1, 2, 3))
    else:
        props["rotation"] = torch.zeros(1)
        props["pixel_change"] = torch.zeros(0)
    props["has_object"] = masks.flatten(1).sum(1) >= MIN_OBJECT_PIXELS
    return props


def strip_effects(strip: Tensor, measurements: dict[str, Tensor] | None = None, min_contrast: float = MIN_CONTRAST) -> dict[str, float]:
    """Signed, normalised change of every property along a strip ``(S, C, H, W)`` (see ``SCALES``).

    Position, rotation, hue, brightness: Theil-Sen change / scale. Area and compactness: Theil-Sen
    change of the log / scale. Adds ``pixel_change`` (mean over consecutive frames of the mean
    absolute difference of 4x4-pooled frames; unsigned, not normalised) and ``object_fraction``
    (the fraction of frames where an object was found). Pass ``measurements`` from
    :func:`strip_measurements` to avoid measuring twice.
    """
    m = measurements if measurements is not None else strip_measurements(strip, min_contrast)
    out: dict[str, float] = {}
    for key in EFFECTS:
        v = m[key].float()
        if key in ("area", "compactness"):
            v = v.clamp_min(1e-8).log()
        out[key] = theil_sen_change(v) / SCALES[key]
    pc = m["pixel_change"]
    out["pixel_change"] = float(pc.mean()) if len(pc) else 0.0
    out["object_fraction"] = float(m["has_object"].float().mean())
    return out
