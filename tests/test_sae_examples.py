"""Example evidence for SAE features: streaming top-k equals a full-matrix reference; maps, overlays, IoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from latentexplainer_plugin.data.shapes import make_dataset
from latentexplainer_plugin.sae import SparseAutoencoder
from latentexplainer_plugin.sae.collect import ActivationStore, collect_activations
from latentexplainer_plugin.sae.examples import (
    ExamplesError, activation_mask, activation_maps, example_set, feature_iou, index_examples, mask_iou, overlay,
    render_example_set,
)

H = W = 2  # 4 positions per item: item means of integers are exact in float32


def _identity_sae(d: int) -> SparseAutoencoder:
    """Features = positive parts of the coordinates: every activation is exact, so ties are real ties."""
    return SparseAutoencoder(torch.eye(d), torch.zeros(d), torch.eye(d), torch.zeros(d), "standard", apply_b_dec_to_input=False)


def _collection(tmp_path, n_items=60, d=6, shard_rows=37, calls=1, seed=0, name="c"):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randint(-3, 3, (n_items, d, H, W), generator=g).float()  # many zeros and ties

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.site = nn.Identity()

        def forward(self, x):
            for _ in range(calls):
                self.site(x)
            return x

    batches = [maps[i:i + 7] for i in range(0, n_items, 7)]
    collect_activations(Loop(), "site", batches, tmp_path / name, shard_rows=shard_rows, calls=calls)
    return maps, ActivationStore(tmp_path / name)


def _reference(maps: torch.Tensor):
    """Full item x feature matrices (what streaming must never build, here on a tiny case)."""
    f = maps.clamp_min(0).flatten(2)  # (items, d, positions)
    return f.mean(2), f.amax(2)


@pytest.mark.parametrize("calls,shard_rows", [(1, 37), (1, 5), (2, 50)])
def test_streaming_top_k_equals_full_matrix_reference(tmp_path, calls, shard_rows):
    maps, store = _collection(tmp_path, calls=calls, shard_rows=shard_rows)
    mean, mx = _reference(maps)
    index = index_examples(_identity_sae(6), store, top_k=7, reservoir=16, contrast=5, chunk_elements=40)
    for j in range(6):
        # reference: highest mean first, ties broken by the smaller item index
        order = sorted(range(len(maps)), key=lambda i: (-float(mean[i, j]), i))
        expected = [(i, float(mean[i, j]), float(mx[i, j])) for i in order[:7] if mx[i, j] > 0]
        got = index.examples(j)
        assert [(e.item, e.mean, e.max) for e in got.top] == expected
        assert got.n_active == int((mx[:, j] > 0).sum()) and got.n_items == len(maps)
        for e in got.contrast:
            assert mx[e.item, j] == 0  # non-activating everywhere on the item
        assert len({e.item for e in got.contrast}) == len(got.contrast) == min(5, int((mx[:, j] == 0).sum()))
        q = got.quantiles
        assert all(mx[e.item, j] > 0 and e.mean == float(mean[e.item, j]) for e in q)
        assert [e.mean for e in q] == sorted(e.mean for e in q) and not ({e.item for e in q} & {e.item for e in got.top})


def test_samples_do_not_depend_on_shard_size_and_dead_features_are_counted(tmp_path):
    maps, store_a = _collection(tmp_path, shard_rows=3, name="a")
    _, store_b = _collection(tmp_path, shard_rows=1000, name="b")
    maps[:, 5] = -1.0  # feature 5 never fires in a third collection
    collect_activations(nn.Identity(), "", [maps[i:i + 9] for i in range(0, 60, 9)], tmp_path / "d")
    a = index_examples(_identity_sae(6), store_a, top_k=3, reservoir=8, contrast=4, seed=3)
    b = index_examples(_identity_sae(6), store_b, top_k=3, reservoir=8, contrast=4, seed=3)
    assert [a.examples(j) for j in range(6)] == [b.examples(j) for j in range(6)]
    d = index_examples(_identity_sae(6), ActivationStore(tmp_path / "d"), top_k=3)
    assert d.dead_features() == [5] and d.examples(5).dead and d.examples(5).top == []
    assert d.dense_features(0.1) == [j for j in range(5) if d.n_active[j] > 6]


def test_activation_maps_equal_direct_encoding(tmp_path):
    maps, store = _collection(tmp_path, shard_rows=9)
    sae = _identity_sae(6)
    got = activation_maps(sae, store, [(2, 0), (2, 33), (4, 59)])
    for (j, i), amap in got.items():
        assert torch.equal(amap, maps[i, j].clamp_min(0))
    with pytest.raises(ExamplesError, match="not in the collection"):
        activation_maps(sae, store, [(1, 500)])
    with pytest.raises(ExamplesError, match="feature 9 is out of range"):
        activation_maps(sae, store, [(9, 1)])


def test_overlay_is_graded_and_iou_on_hand_made_masks():
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    amap = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    out = overlay(image, amap, scale=4.0, floor=0.25)
    # bilinear 2x upsampling keeps the corner pixels at the corner values: 0, 1/4, 1/2, 1 of full scale
    assert out[0, 0, 0] == 50 and out[0, 3, 0] == round(200 * (0.25 + 0.75 * 0.25)) and out[3, 3, 0] == 200
    assert out[3, 0, 0] == round(200 * (0.25 + 0.75 * 0.5))
    assert len(np.unique(out[..., 0])) > 3  # graded, not a binary mask

    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 7) and mask_iou(a, a) == 1.0
    assert math.isnan(mask_iou(np.zeros((2, 2)), np.zeros((2, 2))))
    with pytest.raises(ExamplesError, match="same shape"):
        mask_iou(a, np.zeros((3, 3)))
    # threshold 0.5 of the map's max: a map that is on in its top-left cell only gives the top-left quadrant
    on = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    m = activation_mask(on, (4, 4))
    assert m[0, 0] and not m[3, 3] and int(m.sum()) == 4 and mask_iou(m, a) == 1.0
    assert feature_iou([on, on], [a, b]) == pytest.approx((1.0 + 1 / 7) / 2)
    assert activation_mask(torch.zeros(2, 2), (4, 4)).sum() == 0


def test_shapes_masks_default_is_unchanged_and_mask_covers_the_object():
    plain = make_dataset(20, seed=4)
    with_masks = make_dataset(20, seed=4, masks=True)
    assert list(plain) == list(with_masks)[:-1] and all(np.array_equal(plain[k], with_masks[k]) for k in plain)
    m, img = with_masks["masks"], with_masks["images"].astype(int)
    bg = img[:, 0, 0]  # corners are background (objects stay within 0.25..0.75 +- 0.22 * 1.39)
    for i in range(20):
        inside = np.abs(img[i][m[i]] - bg[i]).sum(-1)
        assert m[i].sum() > 20 and (inside > 30).mean() > 0.95  # object pixels differ from the background
        outside = np.abs(img[i][~m[i]] - bg[i]).sum(-1)
        assert (outside < 3).mean() > 0.9  # except the anti-aliased rim


def test_render_example_set_rows(tmp_path):
    maps, store = _collection(tmp_path)
    sae = _identity_sae(6)
    index = index_examples(sae, store, top_k=5, reservoir=16, contrast=5)
    ex, amaps = example_set(sae, store, index, 1, n_top=3, n_quantiles=2, n_contrast=4)
    assert len(ex.top) == 3 and len(ex.quantiles) == 2 and len(ex.contrast) == 4
    assert set(amaps) == {(1, e.item) for e in ex.top + ex.quantiles}
    images = np.full((60, 8, 8, 3), 180, dtype=np.uint8)
    pic = render_example_set(ex, images, amaps, cell=32)
    assert pic.size == (78 + 4 * 36, 3 * (32 + 14 + 6))
    px = np.asarray(pic)
    # contrast row (third) is drawn without an overlay: its first cell keeps the image's grey
    y = 2 * (32 + 14 + 6)
    assert (px[y + 5, 78 + 5] == 180).all()
    # the top row's strongest example is at full brightness somewhere, dimmed elsewhere
    top_cell = px[0:32, 78:110, 0]
    assert top_cell.max() == 180 and top_cell.min() < 180
    with pytest.raises(ExamplesError, match="top_k must be >= 1"):
        index_examples(sae, store, top_k=0)
    with pytest.raises(ExamplesError, match="d_in=4, but the collection"):
        index_examples(_identity_sae(4), store)


class _CountOpens:
    """Wraps ``safe_open`` in sae.examples and counts the shard files opened."""

    def __init__(self, monkeypatch):
        import latentexplainer_plugin.sae.examples as ex_module

        self.n, real = 0, ex_module.safe_open

        def counting(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(ex_module, "safe_open", counting)


def _random_sae(d_in: int, d_sae: int, seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    return SparseAutoencoder(torch.randn(d_in, d_sae, generator=g), -0.5 * torch.rand(d_sae, generator=g),
                             torch.randn(d_sae, d_in, generator=g), torch.zeros(d_in), "standard")


def test_example_sets_equal_the_per_feature_path_and_a_direct_reference(tmp_path, monkeypatch):
    from latentexplainer_plugin.sae.examples import example_sets

    _, store = _collection(tmp_path, calls=2, shard_rows=37)  # 60 items x 4 positions x 2 calls = 13 shards
    n_shards = len(store.manifest.shards)
    sae = _random_sae(6, 10)
    index = index_examples(sae, store, top_k=4, reservoir=8, contrast=3)
    # reference: every row encoded at once, then the mean over calls per (item, position), by plain loops
    rows = store.load()
    f = sae.encode(rows["activations"].float())
    opts = dict(n_top=4, n_quantiles=3, n_contrast=3)
    counter = _CountOpens(monkeypatch)
    batched = example_sets(sae, store, index, list(range(10)), **opts)
    assert counter.n == n_shards > 1  # one pass for all 10 features
    counter.n = 0
    single = [example_set(sae, store, index, j, **opts) for j in range(10)]
    assert counter.n == 10 * n_shards  # one pass per feature
    checked = 0
    for j, ((ex_b, maps_b), (ex_s, maps_s)) in enumerate(zip(batched, single)):
        assert ex_b == ex_s and ex_b.feature == j
        assert list(maps_b) == list(maps_s) == [(j, e.item) for e in ex_b.top + ex_b.quantiles]
        for (feat, item), amap in maps_b.items():
            assert torch.allclose(amap, maps_s[(feat, item)], atol=1e-6, rtol=0)
            expected = torch.zeros(H * W)
            for p in range(H * W):
                sel = (rows["item"] == item) & (rows["position"] == p)
                expected[p] = f[sel, feat].mean()
            assert torch.allclose(amap.flatten(), expected, atol=1e-6, rtol=0)
            checked += 1
    assert checked > 30
    # chunked encoding (2 rows at a time) gives the same maps
    tiny = example_sets(sae, store, index, [3, 7], chunk_elements=20, **opts)
    for (_, maps_t), j in zip(tiny, (3, 7)):
        assert all(torch.allclose(m, batched[j][1][k], atol=1e-6, rtol=0) for k, m in maps_t.items())


def test_adapter_reads_the_store_once_per_block_of_features(tmp_path, monkeypatch):
    from latentexplainer_plugin.adapters import VAEAdapter
    from latentexplainer_plugin.models.conv_vae import ConvVAE, ConvVAEConfig
    from latentexplainer_plugin.sae import SAEFeatureAdapter
    from latentexplainer_plugin.sae.examples import to_example_set

    torch.manual_seed(0)
    model = ConvVAE(ConvVAEConfig(latent_dim=4, image_size=16, width=8, hidden=16)).eval()
    adapter = SAEFeatureAdapter(VAEAdapter(model), _random_sae(8, 12, seed=1), site="decoder.deconv.0.input")
    with pytest.raises(ValueError, match="attach_examples"):
        adapter.prefetch_examples([0])
    images = (np.random.default_rng(0).random((30, 16, 16, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        mu = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0]
    collect_activations(adapter.inner.driver, adapter.site, [mu[i:i + 8] for i in range(0, 30, 8)], tmp_path / "s",
                        shard_rows=100)  # 30 items x 16 positions: 5 shards
    store = ActivationStore(tmp_path / "s")
    n_shards = len(store.manifest.shards)
    with pytest.raises(ExamplesError, match="block must be an int >= 1"):
        adapter.attach_examples(images, store=store, block=0)
    adapter.attach_examples(images, store=store, n_top=3, n_quantiles=2, n_contrast=2, block=5)
    e = adapter._examples
    counter = _CountOpens(monkeypatch)
    got = [adapter.example_set(i) for i in range(12)]
    assert counter.n == math.ceil(12 / 5) * n_shards == 3 * n_shards > 3
    assert e["sets"]._ready == {}  # every prefetched set was handed out: nothing held
    counter.n = 0
    for i, s in enumerate(got):
        ex, maps = example_set(e["sets"].sae, store, e["index"], i, n_top=3, n_quantiles=2, n_contrast=2)
        ref = to_example_set(ex, images, maps, latent_id=f"f{i}")
        assert s.latent_id == ref.latent_id and s.meta == ref.meta
        assert torch.equal(s.activating, ref.activating) and torch.equal(s.inactive, ref.inactive)
        assert torch.equal(s.activations, ref.activations)
        assert (s.maps is None) == (ref.maps is None)
        if s.maps is not None:
            assert torch.allclose(s.maps, ref.maps, atol=1e-6, rtol=0)
    live = [i for i, s in enumerate(got) if len(s.activating)]
    assert 6 <= len(live) < 12 and counter.n == len(live) * n_shards  # per feature: a pass each (none for a dead one)
    counter.n = 0
    again = adapter.example_set(live[-1])  # asked again, out of order: read again (with nothing left after it)
    assert counter.n == n_shards and again.meta == got[live[-1]].meta


def test_run_usage_counts_example_answers_and_summary_shows_them():
    from types import SimpleNamespace

    from latentexplainer_plugin.run import _run_usage, summarize

    def usage(p, c, r):
        return {"prompt_tokens": p, "completion_tokens": c, "requests": r}

    entries = {
        "f1": {"id": "f1", "status": "ok", "clear": True, "certainty": 0.9, "explanation": "makes the object larger",
               "usage": usage(100, 20, 5), "examples": {"status": "ok", "clear": True, "certainty": 0.8,
                                                        "explanation": "f1 fires when the object is on the left",
                                                        "usage": usage(300, 40, 5)}},
        "f2": {"id": "f2", "status": "ok", "clear": False, "certainty": 0.3, "explanation": None, "usage": usage(10, 2, 1),
               "examples": {"status": "ok", "clear": False, "certainty": 0.4, "explanation": None, "usage": usage(7, 1, 1)}},
        "f3": {"id": "f3", "status": "ok", "clear": False, "certainty": None, "explanation": None,
               "examples": {"status": "failed", "error": "ValueError: no images"}},
    }
    total = _run_usage(SimpleNamespace(entries=entries), SimpleNamespace(bias=None))
    assert total == usage(100 + 300 + 10 + 7, 20 + 40 + 2 + 1, 5 + 5 + 1 + 1)
    text, code = summarize({"latents": list(entries.values()), "status": "complete"})
    lines = text.splitlines()
    assert code == 0 and len(lines) == 6
    assert lines[1] == "        examples: [0.80] f1 fires when the object is on the left"
    assert lines[3] == "        examples: [0.40] no clear explanation"
    assert lines[5] == "        examples: FAILED ValueError: no images"
