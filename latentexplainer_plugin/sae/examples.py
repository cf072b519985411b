"""Example evidence for SAE features: the images where a feature fires, with graded activation maps.

One streamed pass over a collection (:mod:`~latentexplainer_plugin.sae.collect`) keeps, for every
feature at once and never the full item x feature matrix:

1. the feature's activation per item (image, prompt): the mean over the item's positions (and
   calls), and the max, as in arXiv 2411.14982 (mean over image tokens);
2. the ``top_k`` items with the highest mean, by a running merge (ties: the smaller item index);
3. a uniform sample of ``reservoir`` activating items (mean > 0), from which examples across the
   activation quantiles are drawn (delphi found top + quantiles + contrast beats top only);
4. a uniform sample of non-activating items (the feature is 0 at every position): the contrast set.

Samples 3-4 keep the items with the smallest hash of (item, feature, seed), so they do not depend
on shard or batch sizes. Then :func:`activation_maps` reads back only the shards that hold the
chosen items (:func:`example_sets`: the maps of many features' examples in one pass), :func:`overlay` dims each image by the feature's activation (graded, not binary),
:func:`render_example_set` draws one feature's examples as a single PIL image (rows: top,
quantiles, non-activating), and :func:`mask_iou` compares an activation mask with a ground-truth
object mask.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..errors import ExamplesError  # noqa: F401 (re-exported)
from ..types import ExampleSet
from .collect import ActivationStore

_EMPTY_KEY = 1 << 31  # larger than any hash value (hashes are 31-bit)
MASK_THRESHOLD = 0.5  # activation mask: upsampled map > 0.5 x the map's own max (see activation_mask)


@dataclass
class Example:
    """One item shown as evidence for a feature: its mean and max activation over positions."""

    item: int
    mean: float
    max: float
    group: str  # "top", "quantile" or "contrast"
    quantile: float | None = None  # for "quantile": the rank among the sampled activating items (0..1)


@dataclass
class FeatureExamples:
    """A feature's example set: ``n_active`` of ``n_items`` items have the feature on somewhere."""

    feature: int
    n_items: int
    n_active: int
    top: list[Example] = field(default_factory=list)
    quantiles: list[Example] = field(default_factory=list)
    contrast: list[Example] = field(default_factory=list)

    @property
    def frequency(self) -> float:
        return self.n_active / self.n_items if self.n_items else 0.0

    @property
    def dead(self) -> bool:
        return self.n_active == 0

    def all(self) -> list[Example]:
        return self.top + self.quantiles + self.contrast


def _hash_keys(items: torch.Tensor, features: torch.Tensor, seed: int) -> torch.Tensor:
    """A 31-bit integer hash of (item, feature, seed), (m, d_sae) int64; int64 arithmetic never overflows."""
    m32 = 0xFFFFFFFF
    h = (items[:, None] * 2654435761 + features[None, :] * 40503 + seed * 97 + 1) & m32
    for _ in range(2):
        h = h ^ (h >> 16)
        h = (h * 0x45D9F3B) & m32
    return (h ^ (h >> 16)) & 0x7FFFFFFF


def _merge(state: list[torch.Tensor], cand: list[torch.Tensor], sl: slice, better: torch.Tensor, n: int, descending: bool) -> None:
    """Keep, in place, the first ``n`` rows of state + candidates ordered by the first tensor, ties
    to the earlier row (state rows come first), for the columns of slice ``sl`` where some candidate
    is ``better`` than the n-th. The order is one top-k over a tie-free int64 key: descending float
    scores >= 0 (whose bit patterns sort like the numbers) or ascending 31-bit hash keys, then the row."""
    cols = torch.nonzero(better.any(0)).flatten()
    if not len(cols):
        return
    at = cols + sl.start
    keys = torch.cat([state[0][:, at], cand[0][:, cols]])
    row = torch.arange(len(keys))[:, None]
    if descending:
        composite = (keys.contiguous().view(torch.int32).long() << 32) + ((1 << 32) - 1 - row)
    else:
        composite = (keys << 31) + row
    order = torch.topk(composite, n, dim=0, largest=descending, sorted=True).indices
    for s, c in zip(state, cand):
        s[:, at] = torch.cat([s[:, at], c[:, cols]]).gather(0, order)


class ExampleIndex:
    """Streaming state over all features (see the module docstring); build it with :func:`index_examples`."""

    def __init__(self, d_sae: int, top_k: int, reservoir: int, contrast: int, seed: int, rank_by: str):
        self.d_sae, self.top_k, self.reservoir, self.n_contrast, self.seed, self.rank_by = d_sae, top_k, reservoir, contrast, seed, rank_by
        self.top_score = torch.full((top_k, d_sae), -1.0)  # below any activation (>= 0): empty slot
        self.top_item = torch.full((top_k, d_sae), -1, dtype=torch.long)
        self.top_other = torch.zeros(top_k, d_sae)  # the other statistic (max when ranking by mean, and back)
        self.res_key = torch.full((reservoir, d_sae), _EMPTY_KEY, dtype=torch.long)
        self.res_item = torch.full((reservoir, d_sae), -1, dtype=torch.long)
        self.res_mean = torch.zeros(reservoir, d_sae)
        self.res_max = torch.zeros(reservoir, d_sae)
        self.con_key = torch.full((contrast, d_sae), _EMPTY_KEY, dtype=torch.long)
        self.con_item = torch.full((contrast, d_sae), -1, dtype=torch.long)
        self.n_active = torch.zeros(d_sae, dtype=torch.long)
        self.n_items = 0
        # filled by index_examples from every row: positions seen, positions where each feature is on, its peak
        self.n_positions = 0
        self.active_positions = torch.zeros(d_sae, dtype=torch.float64)
        self.peak = torch.zeros(d_sae)
        self.features = torch.arange(d_sae)

    def update(self, items: torch.Tensor, mean: torch.Tensor, maxes: torch.Tensor) -> None:
        """Merge items (m,) in increasing order with their per-feature mean and max (m, d_sae)."""
        m = len(items)
        on = maxes > 0
        self.n_active += on.sum(0)
        self.n_items += m
        score, other = (mean, maxes) if self.rank_by == "mean" else (maxes, mean)
        score = score.float() + 0.0  # -0.0 -> +0.0, so that bit patterns order the scores
        step = max(1, (1 << 20) // (m + self.reservoir + self.top_k))  # feature slices bound the temporaries
        for c0 in range(0, self.d_sae, step):
            sl = slice(c0, min(c0 + step, self.d_sae))
            item_col = items[:, None].expand(m, sl.stop - sl.start)
            # 2. top-k; a candidate equal to the k-th score loses (it has the larger item index)
            _merge([self.top_score, self.top_item, self.top_other], [score[:, sl], item_col, other[:, sl]], sl,
                   score[:, sl] > self.top_score[-1, sl], self.top_k, descending=True)
            if not (self.reservoir or self.n_contrast):
                continue
            keys = _hash_keys(items, self.features[sl], self.seed)
            if self.reservoir:  # 3. activating items with the smallest keys
                k = torch.where(on[:, sl], keys, _EMPTY_KEY)
                _merge([self.res_key, self.res_item, self.res_mean, self.res_max], [k, item_col, mean[:, sl], maxes[:, sl]],
                       sl, k < self.res_key[-1, sl], self.reservoir, descending=False)
            if self.n_contrast:  # 4. non-activating items with the smallest keys
                k = torch.where(on[:, sl], _EMPTY_KEY, keys)
                _merge([self.con_key, self.con_item], [k, item_col], sl, k < self.con_key[-1, sl], self.n_contrast, descending=False)

    def examples(self, feature: int, n_top: int | None = None, n_quantiles: int = 5, n_contrast: int | None = None) -> FeatureExamples:
        """The example set of ``feature``: top items, items across activation quantiles, non-activating items."""
        if not 0 <= feature < self.d_sae:
            raise ExamplesError(f"feature {feature} is out of range; the SAE has features 0..{self.d_sae - 1}")
        n_top = self.top_k if n_top is None else min(n_top, self.top_k)
        n_contrast = self.n_contrast if n_contrast is None else min(n_contrast, self.n_contrast)
        j = feature
        out = FeatureExamples(feature=j, n_items=self.n_items, n_active=int(self.n_active[j]))
        for r in range(n_top):
            item, score, other = int(self.top_item[r, j]), float(self.top_score[r, j]), float(self.top_other[r, j])
            mean, mx = (score, other) if self.rank_by == "mean" else (other, score)
            if item >= 0 and mx > 0:
                out.top.append(Example(item, mean, mx, "top"))
        taken = {e.item for e in out.top}
        valid = self.res_key[:, j] < _EMPTY_KEY
        pool = [(float(self.res_mean[r, j]), float(self.res_max[r, j]), int(self.res_item[r, j]))
                for r in torch.nonzero(valid).flatten().tolist() if int(self.res_item[r, j]) not in taken]
        pool.sort(key=lambda t: (t[0], t[2]))
        if pool and n_quantiles > 0:
            picks = sorted({min(len(pool) - 1, int((i + 0.5) / n_quantiles * len(pool))) for i in range(n_quantiles)})
            for p in picks:
                mean, mx, item = pool[p]
                out.quantiles.append(Example(item, mean, mx, "quantile", quantile=round((p + 0.5) / len(pool), 4)))
        for r in range(n_contrast):
            item = int(self.con_item[r, j])
            if item >= 0:
                out.contrast.append(Example(item, 0.0, 0.0, "contrast"))
        return out

    def dead_features(self) -> list[int]:
        """Features that never fire on any item."""
        return torch.nonzero(self.n_active == 0).flatten().tolist()

    def dense_features(self, threshold: float = 0.1) -> list[int]:
        """Features active on more than ``threshold`` of the items (default 10 %)."""
        return torch.nonzero(self.n_active > threshold * max(self.n_items, 1)).flatten().tolist()

    def statistics(self, features: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Per feature (all, or ``features`` in that order), from the data: ``frequency`` (share of
        items where it fires anywhere), ``position_frequency`` (share of rows), ``max`` (its peak over
        every row), ``median_active`` (median peak per item over the sampled activating items, the
        reservoir: an estimate from up to ``reservoir`` items) and ``dead`` (fires on no item)."""
        picked = torch.arange(self.d_sae) if features is None else torch.as_tensor(list(features), dtype=torch.long)
        valid = self.res_key[:, picked] < _EMPTY_KEY
        sampled = torch.where(valid, self.res_max[:, picked], torch.full_like(self.res_max[:, picked], float("nan")))
        median = sampled.nanmedian(dim=0).values.nan_to_num(0.0) if len(sampled) else torch.zeros(len(picked))
        return {"frequency": self.n_active[picked].float() / max(self.n_items, 1),
                "position_frequency": (self.active_positions[picked] / max(self.n_positions, 1)).float(),
                "median_active": median.float(), "max": self.peak[picked].clone(), "dead": self.n_active[picked] == 0}


def _encode(sae: Any, rows: torch.Tensor) -> torch.Tensor:
    return sae.encode(rows).float()


@torch.no_grad()
def index_examples(sae: Any, store: ActivationStore | str, *, top_k: int = 10, reservoir: int = 64, contrast: int = 10,
                   seed: int = 0, rank_by: str = "mean", chunk_elements: int = 1 << 22) -> ExampleIndex:
    """One streamed pass over ``store`` that selects example items for every feature of ``sae``.

    ``top_k``: items kept per feature by activation (``rank_by`` "mean" or "max" over positions);
    ``reservoir``: activating items sampled per feature (quantile examples come from these);
    ``contrast``: non-activating items sampled per feature. ``chunk_elements`` bounds each block
    of numbers worked on at once: chunk_elements // d_sae items are merged together, and as many
    rows encoded together (4M floats = 16 MB by default). Memory: the state, (2 top_k + 4 reservoir
    + 2 contrast) x d_sae numbers, plus one shard, the rows of one unfinished batch, and a few blocks.
    """
    store = ActivationStore(store) if not isinstance(store, ActivationStore) else store
    for name, value in (("top_k", top_k), ("reservoir", reservoir), ("contrast", contrast)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ExamplesError(f"{name} must be an int >= 0, got {value!r}")
    if top_k < 1:
        raise ExamplesError(f"top_k must be >= 1, got {top_k}")
    if rank_by not in ("mean", "max"):
        raise ExamplesError(f"rank_by must be 'mean' or 'max', got {rank_by!r}")
    if int(sae.d_in) != store.d_in:
        raise ExamplesError(f"the SAE has d_in={int(sae.d_in)}, but the collection at {store.directory} has {store.d_in} features per row")
    d_sae = int(sae.d_sae)
    index = ExampleIndex(d_sae, top_k, reservoir, contrast, seed, rank_by)
    per_item = store.manifest.positions_per_item * store.manifest.calls
    block = max(1, chunk_elements // d_sae)  # items per merge, and rows per encode: blocks of <= chunk_elements
    carry: dict[str, torch.Tensor] | None = None

    def process(acts: torch.Tensor, items: torch.Tensor) -> None:
        order = torch.sort(items, stable=True).indices  # group each item's rows (calls interleave items)
        acts, items = acts[order], items[order]
        uniq, counts = torch.unique_consecutive(items, return_counts=True)
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
        for s in range(0, len(uniq), block):
            e = min(s + block, len(uniq))
            rows = acts[bounds[s]:bounds[e]]
            local = torch.repeat_interleave(torch.arange(e - s), counts[s:e])
            sums, maxes = torch.zeros(e - s, d_sae), torch.zeros(e - s, d_sae)
            for r in range(0, len(rows), block):
                f, at = _encode(sae, rows[r:r + block]), local[r:r + block]
                index.n_positions += len(f)
                index.active_positions += (f > 0).sum(0).double()
                index.peak = torch.maximum(index.peak, f.amax(0)) if len(f) else index.peak
                sums.index_add_(0, at, f)
                maxes.scatter_reduce_(0, at[:, None].expand_as(f), f, "amax")
            index.update(uniq[s:e], sums / counts[s:e, None].float(), maxes)

    for part in store.iter_shards(("activations", "item")):
        acts, items = part["activations"], part["item"]
        if carry is not None:
            acts, items = torch.cat([carry["activations"], acts]), torch.cat([carry["item"], items])
        base = int(items.min())
        counts = torch.bincount(items - base)
        incomplete = torch.nonzero((counts > 0) & (counts < per_item)).flatten()
        cut = base + int(incomplete[0]) if len(incomplete) else int(items.max()) + 1  # items below are complete
        done = items < cut
        if done.any():
            process(acts[done], items[done])
        carry = {"activations": acts[~done], "item": items[~done]} if (~done).any() else None
    if carry is not None:  # a truncated last item: score it with the rows it has
        process(carry["activations"], carry["item"])
    return index


def _grid(positions: Sequence[int], grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        return int(grid[0]), int(grid[1])
    if len(positions) == 2:
        return int(positions[0]), int(positions[1])
    if len(positions) == 0:
        return 1, 1
    n = math.prod(positions)
    side = math.isqrt(n)
    if side * side == n:  # e.g. 576 vision tokens of a 24 x 24 patch grid
        return side, side
    raise ExamplesError(f"cannot draw positions {tuple(positions)} as an image map; pass grid=(H, W) with H * W = {n}")


@torch.no_grad()
def activation_maps(sae: Any, store: ActivationStore | str, requests: Sequence[tuple[int, int]], *,
                    grid: tuple[int, int] | None = None, chunk_elements: int = 1 << 22) -> dict[tuple[int, int], torch.Tensor]:
    """Activation maps (H, W) for (feature, item) pairs, mean over calls, in one pass over the shards.

    Reads the activations only of shards holding requested items, and keeps only the requested
    (feature, item) maps: memory is the maps, one shard's hit rows, and encoded blocks of at most
    ``chunk_elements`` numbers. Positions come from the collection: (H, W) of a conv feature map,
    a square number of tokens (drawn as a square grid), or ``grid`` given explicitly; one vector
    per item gives a 1 x 1 map.
    """
    store = ActivationStore(store) if not isinstance(store, ActivationStore) else store
    h, w = _grid(store.manifest.positions, grid)
    p = store.manifest.positions_per_item
    if h * w != p:
        raise ExamplesError(f"grid {(h, w)} has {h * w} cells, but each item has {p} positions")
    d_sae = int(sae.d_sae)
    keys = list(dict.fromkeys((int(f), int(i)) for f, i in requests))  # request order, no repeats
    bad = [f for f, _ in keys if not 0 <= f < d_sae]
    if bad:
        raise ExamplesError(f"feature {bad[0]} is out of range; the SAE has features 0..{d_sae - 1}")
    if not keys:
        return {}
    # pairs grouped by item: the rows of item u meet pairs pair_start[u] .. pair_start[u] + pair_count[u] - 1
    order = sorted(range(len(keys)), key=lambda n: (keys[n][1], keys[n][0]))
    pair_feat = torch.tensor([keys[n][0] for n in order], dtype=torch.long)
    pair_item = torch.tensor([keys[n][1] for n in order], dtype=torch.long)
    wanted, pair_count = torch.unique_consecutive(pair_item, return_counts=True)
    pair_start = pair_count.cumsum(0) - pair_count
    columns = torch.unique(pair_feat)  # the only features kept after encoding
    pair_col = torch.searchsorted(columns, pair_feat)
    sums = torch.zeros(len(keys) * p, dtype=torch.float64)
    counts = torch.zeros(len(wanted) * p, dtype=torch.float64)
    rows_per_encode = max(1, chunk_elements // d_sae)
    for shard in store.manifest.shards:
        with safe_open(str(store.directory / shard["file"]), framework="pt") as fh:
            items = fh.get_tensor("item")
            hit = torch.isin(items, wanted)
            if not hit.any():
                continue
            acts = fh.get_tensor("activations")[hit]
            pos = fh.get_tensor("position")[hit].long()
        slot = torch.searchsorted(wanted, items[hit])
        counts.index_add_(0, slot * p + pos, torch.ones(len(slot), dtype=torch.float64))
        for r in range(0, len(acts), rows_per_encode):
            f = _encode(sae, acts[r:r + rows_per_encode].float())[:, columns]  # (rows, requested features)
            s, at = slot[r:r + rows_per_encode], pos[r:r + rows_per_encode]
            n = pair_count[s]
            row = torch.repeat_interleave(torch.arange(len(s)), n)  # each row once per pair of its item
            first = torch.repeat_interleave(n.cumsum(0) - n, n)
            pair = torch.repeat_interleave(pair_start[s], n) + torch.arange(len(row)) - first
            sums.index_add_(0, pair * p + at[row], f[row, pair_col[pair]].double())
    counts = counts.view(len(wanted), p)
    seen = counts.sum(1) > 0
    if not seen.all():
        missing = wanted[~seen].tolist()
        raise ExamplesError(f"items {missing[:10]} are not in the collection at {store.directory} ({store.manifest.n_items} items)")
    means = (sums.view(len(keys), p) / counts[torch.searchsorted(wanted, pair_item)].clamp_min(1)).float()
    by_key = {(int(f), int(i)): means[n].reshape(h, w) for n, (f, i) in enumerate(zip(pair_feat.tolist(), pair_item.tolist()))}
    return {key: by_key[key] for key in keys}


def upsample(amap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of an (h, w) map to ``size`` (H, W)."""
    return F.interpolate(amap[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def overlay(image: np.ndarray, amap: torch.Tensor, scale: float | None = None, floor: float = 0.25) -> np.ndarray:
    """Dim ``image`` (H, W, 3 uint8) where the feature is weak: pixel * (floor + (1 - floor) * a / scale).

    Graded, not binary: ``a`` is the map upsampled to the image, ``scale`` the activation shown at
    full brightness (default: the map's max; pass the feature's top activation to compare images).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ExamplesError(f"images must be (H, W, 3), got shape {image.shape}")
    a = upsample(amap, image.shape[:2])
    scale = float(scale) if scale is not None else float(a.max())
    level = (a / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(a)
    out = image.astype(np.float32) * (floor + (1 - floor) * level.numpy()[..., None])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def activation_mask(amap: torch.Tensor, size: tuple[int, int], threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Boolean (H, W) mask: the map upsampled to ``size`` is above ``threshold`` x its own max.

    Empty when the feature is 0 everywhere. (2411.14982 uses activation > 1e-5; a relative
    threshold is used here because a graded map is positive over a wide halo after upsampling.)
    """
    if not 0 <= threshold < 1:
        raise ExamplesError(f"threshold must be in [0, 1), a fraction of the map's max, got {threshold!r}")
    a = upsample(amap, size)
    top = float(a.max())
    if top <= 0:
        return torch.zeros(size, dtype=torch.bool)
    return a > threshold * top


def mask_iou(a: Any, b: Any) -> float:
    """Intersection over union of two boolean masks of the same shape; NaN when both are empty."""
    a, b = torch.as_tensor(np.asarray(a)).bool(), torch.as_tensor(np.asarray(b)).bool()
    if a.shape != b.shape:
        raise ExamplesError(f"masks must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else float("nan")


def feature_iou(amaps: Sequence[torch.Tensor], masks: Sequence[Any], threshold: float = MASK_THRESHOLD) -> float:
    """Mean IoU of the activation masks of ``amaps`` against ground-truth ``masks`` (pairs with an empty union are skipped)."""
    if len(amaps) != len(masks):
        raise ExamplesError(f"got {len(amaps)} maps but {len(masks)} masks; give one mask per map")
    scores = [mask_iou(activation_mask(m, tuple(np.asarray(g).shape), threshold), g) for m, g in zip(amaps, masks)]
    scores = [s for s in scores if not math.isnan(s)]
    return sum(scores) / len(scores) if scores else float("nan")


def _images_for(images: Any, items: list[int]) -> list[np.ndarray]:
    if callable(images):
        got = images(items)
    else:
        got = [images[i] for i in items]
    out = [np.asarray(g) for g in got]
    if len(out) != len(items):
        raise ExamplesError(f"the image source returned {len(out)} images for {len(items)} items")
    return out


def render_example_set(examples: FeatureExamples, images: Any, maps: dict[tuple[int, int], torch.Tensor] | None = None, *,
                       cell: int = 96, floor: float = 0.25) -> Any:
    """One PIL image of a feature's evidence: a row each for top, quantile and non-activating examples.

    ``images``: an indexable of (H, W, 3) uint8 images by item, or a callable ``items -> images``.
    ``maps``: (feature, item) -> activation map (from :func:`activation_maps`); every activating
    example is overlaid with its map, scaled by the feature's top activation so rows compare.
    Each cell is captioned with the item's mean and max activation.
    """
    from PIL import Image, ImageDraw

    rows = [("top", examples.top), ("quantiles", examples.quantiles), ("inactive", examples.contrast)]
    width = max(1, max(len(r) for _, r in rows))
    label_w, caption_h = 78, 14
    canvas = Image.new("RGB", (label_w + width * (cell + 4), len(rows) * (cell + caption_h + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    scale = max([e.max for e in examples.top] or [0.0]) or None
    for r, (label, row) in enumerate(rows):
        y = r * (cell + caption_h + 6)
        draw.text((4, y + cell // 2 - 6), label, fill=(0, 0, 0))
        if not row:
            draw.text((label_w, y + cell // 2 - 6), "(none)", fill=(120, 120, 120))
            continue
        for c, (ex, img) in enumerate(zip(row, _images_for(images, [e.item for e in row]))):
            amap = maps.get((examples.feature, ex.item)) if maps else None
            if amap is not None:
                img = overlay(img, amap, scale=scale, floor=floor)
            tile = Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((cell, cell), Image.NEAREST)
            x = label_w + c * (cell + 4)
            canvas.paste(tile, (x, y))
            draw.text((x, y + cell + 1), f"#{ex.item} {ex.mean:.2f}/{ex.max:.2f}", fill=(0, 0, 0))
    return canvas


def example_sets(sae: Any, store: ActivationStore | str, index: ExampleIndex, features: Sequence[int], *, n_top: int = 5,
                 n_quantiles: int = 5, n_contrast: int = 5, grid: tuple[int, int] | None = None,
                 chunk_elements: int = 1 << 22) -> list[tuple[FeatureExamples, dict[tuple[int, int], torch.Tensor]]]:
    """:func:`example_set` for several features with one pass over the store (one call of
    :func:`activation_maps` for all their activating examples), in the order of ``features``."""
    found = [index.examples(int(j), n_top=n_top, n_quantiles=n_quantiles, n_contrast=n_contrast) for j in features]
    wanted = [(ex.feature, e.item) for ex in found for e in ex.top + ex.quantiles]
    maps = activation_maps(sae, store, wanted, grid=grid, chunk_elements=chunk_elements) if wanted else {}
    return [(ex, {(ex.feature, e.item): maps[(ex.feature, e.item)] for e in ex.top + ex.quantiles}) for ex in found]


def example_set(sae: Any, store: ActivationStore | str, index: ExampleIndex, feature: int, *, n_top: int = 5,
                n_quantiles: int = 5, n_contrast: int = 5, grid: tuple[int, int] | None = None
                ) -> tuple[FeatureExamples, dict[tuple[int, int], torch.Tensor]]:
    """A feature's examples plus the activation maps of its activating ones (what a backend is shown).

    One pass over the store per call: for many features use :func:`example_sets`."""
    return example_sets(sae, store, index, [feature], n_top=n_top, n_quantiles=n_quantiles, n_contrast=n_contrast,
                        grid=grid)[0]


def _as_chw(images: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 (or floats in [0, 1]) images -> (N, 3, H, W) float in [0, 1]."""
    if not images:
        return torch.zeros(0, 3, 1, 1)
    arr = np.stack([np.asarray(i) for i in images])
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ExamplesError(f"example images must be (H, W, 3) or (H, W, 1), got shape {arr.shape[1:]}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float().clamp(0.0, 1.0)
    return t.permute(0, 3, 1, 2).contiguous()


def to_example_set(examples: FeatureExamples, images: Any, maps: dict[tuple[int, int], torch.Tensor] | None = None, *,
                   latent_id: str | None = None, masks: Any = None) -> ExampleSet:
    """A feature's examples as the plain :class:`~latentexplainer_plugin.types.ExampleSet` a backend is shown.

    Activating images: the top examples, then the quantile examples (strongest first), with their
    mean activation and, when ``maps`` has them, their activation maps; inactive images: the
    contrast examples. ``images`` as in :func:`render_example_set`. ``masks`` (indexable by item,
    (H, W) bool object masks): the mean IoU of the top examples' activation masks against them
    goes to ``meta["iou"]`` (see :func:`feature_iou`); not for a site with one position per item
    (a 1 x 1 map covers the whole image, so its IoU would only be the object's area).
    """
    active = sorted(examples.top + examples.quantiles, key=lambda e: (-e.mean, e.item))
    imgs = _as_chw(_images_for(images, [e.item for e in active])) if active else None
    inactive = _as_chw(_images_for(images, [e.item for e in examples.contrast])) if examples.contrast else None
    shape = (imgs if imgs is not None else inactive)
    chw = tuple(shape.shape[1:]) if shape is not None else (3, 1, 1)
    imgs = imgs if imgs is not None else torch.zeros(0, *chw)
    inactive = inactive if inactive is not None else torch.zeros(0, *chw)
    amaps = None
    if maps and active and all((examples.feature, e.item) in maps for e in active):
        amaps = torch.stack([maps[(examples.feature, e.item)].float() for e in active])
    meta: dict[str, Any] = {"feature": examples.feature, "n_items": examples.n_items, "n_active_items": examples.n_active,
                            "frequency": round(examples.frequency, 6), "items": [e.item for e in active],
                            "groups": [e.group for e in active], "inactive_items": [e.item for e in examples.contrast]}
    if masks is not None and amaps is not None and tuple(amaps.shape[-2:]) != (1, 1):  # a 1 x 1 map says nowhere
        top = [i for i, e in enumerate(active) if e.group == "top"]
        iou = feature_iou([amaps[i] for i in top], [np.asarray(masks[active[i].item]) for i in top]) if top else float("nan")
        meta["iou"] = None if math.isnan(iou) else round(iou, 4)
    return ExampleSet(latent_id=latent_id or f"f{examples.feature}", activating=imgs,
                      activations=torch.tensor([e.mean for e in active], dtype=torch.float32), inactive=inactive,
                      maps=amaps, meta=meta)



class BlockedExamples:
    """The example sets of ``features[i]``, served so that one pass over the store reads the
    activation maps of ``block`` features: asking for latent i reads the maps of i and of the next
    ``block - 1`` latents not yet served, held until each is asked for (latents explained in
    increasing order read the store about len(features) / ``block`` times, not once each).
    ``images`` and ``masks`` as in :func:`to_example_set`."""

    def __init__(self, sae: Any, store: ActivationStore | str, index: "ExampleIndex", features: Sequence[int], images: Any,
                 *, masks: Any = None, n_top: int = 10, n_quantiles: int = 10, n_contrast: int = 20, block: int = 64):
        self.sae, self.store, self.index, self.features = sae, store, index, list(features)
        self.images, self.masks, self.block = images, masks, block
        self.n_top, self.n_quantiles, self.n_contrast = n_top, n_quantiles, n_contrast
        self._ready: dict[int, tuple[FeatureExamples, dict[tuple[int, int], torch.Tensor]]] = {}
        self._served: set[int] = set()

    def prefetch(self, positions: Sequence[int]) -> None:
        """Read the examples and maps of ``features[i]`` for each i in ``positions`` in one pass over the
        store (replaces earlier prefetches)."""
        positions = list(dict.fromkeys(positions))
        found = example_sets(self.sae, self.store, self.index, [self.features[i] for i in positions], n_top=self.n_top,
                             n_quantiles=self.n_quantiles, n_contrast=self.n_contrast)
        self._ready = dict(zip(positions, found))

    def get(self, i: int, latent_id: str | None = None) -> ExampleSet:
        """The :class:`~latentexplainer_plugin.types.ExampleSet` of ``features[i]``."""
        if i not in self._ready:
            after = (j for j in range(i + 1, len(self.features)) if j not in self._served)
            self.prefetch([i, *itertools.islice(after, self.block - 1)])
        found, maps = self._ready.pop(i)
        self._served.add(i)
        return to_example_set(found, self.images, maps, latent_id=latent_id, masks=self.masks)


__all__ = [
    "BlockedExamples", "Example", "ExampleIndex", "ExamplesError", "FeatureExamples", "MASK_THRESHOLD", "activation_mask", "activation_maps",
    "example_set", "example_sets", "feature_iou", "index_examples", "mask_iou", "overlay", "render_example_set", "to_example_set", "upsample",
]
