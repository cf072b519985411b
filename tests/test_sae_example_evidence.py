"""Example evidence for SAE features reaches the explainer: the offline contrastive mode on example
sets with a known truth, the example-set prompt a chat backend is sent, and the whole path on the
demo VAE with an axis SAE (feature k = latent k) whose examples come from the demo data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentexplainer_plugin.backends.base import Backend, BackendError
from latentexplainer_plugin.backends.offline import OfflineBackend, cliffs_delta, contrast_properties
from latentexplainer_plugin.biases.examples import EXAMPLES_ABSTAIN, GAP, LABEL_WIDTH, CAPTION_HEIGHT, build_example_prompt
from latentexplainer_plugin.data.shapes import render, sample_factors
from latentexplainer_plugin.types import ExampleSet, Response
from latentexplainer_plugin.uncertainty import get_similarity, select_explanation

AGREE = get_similarity("agree")


def _images(factors: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(render(factors)).permute(0, 3, 1, 2).float() / 255.0


def _pool(seed: int = 0, n: int = 400) -> np.ndarray:
    return sample_factors(n, seed=seed)


def _set(firing: np.ndarray, not_firing: np.ndarray, name: str = "f7") -> ExampleSet:
    acts = torch.linspace(2.0, 0.2, len(firing))
    return ExampleSet(name, _images(firing), acts, _images(not_firing))


def _claims(responses: list[Response]) -> list[list[dict]]:
    return [r.meta["claims"] for r in responses]


@pytest.mark.parametrize("side,direction", [("left", "-"), ("right", "+")])
def test_contrast_names_the_side_where_the_feature_fires(side, direction):
    f = _pool()
    left, right = f[f[:, 1] < 0.45][:20], f[f[:, 1] > 0.55][:20]
    firing, other = (left, right) if side == "left" else (right, left)
    answers = OfflineBackend().explain_examples(_set(firing, other), None, 5)
    assert len(answers) == 5 and not any(r.abstained for r in answers)
    # every disjoint subset separates perfectly on x: Cliff's delta -1 (left) or +1 (right)
    assert all(r.meta["separation"]["x"] == (-1.0 if side == "left" else 1.0) for r in answers)
    assert all({"attribute": "horizontal_position", "direction": direction} in c for c in _claims(answers))
    assert f"on the {side}" in answers[0].text
    chosen = select_explanation(answers, AGREE, AGREE.default_threshold)
    assert chosen.clear and chosen.certainty >= 0.8 and f"object is on the {side}" in chosen.explanation


def test_contrast_names_a_colour_across_the_hue_wrap():
    f = _pool(1)
    firing = f[:20].copy()
    firing[:, 5] = np.linspace(-0.03, 0.03, 20) % 1.0  # red on both sides of hue 0 (0.97 .. 0.03)
    other = f[20:40].copy()
    other[:, 5] = np.linspace(0.3, 0.7, 20)  # green .. blue
    answers = OfflineBackend().explain_examples(_set(firing, other), None, 4)
    assert all({"attribute": "colour", "end": "red"} in c for c in _claims(answers))
    assert all(r.meta["separation"]["hue"] == 1.0 for r in answers)
    # a linear hue mean would put the firing set at cyan (0.5): the circular mean names red
    assert all(r.meta["colour"] == "red" for r in answers)
    assert select_explanation(answers, AGREE, AGREE.default_threshold).clear


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_split_is_not_clear(seed):
    f = _pool(10 + seed)
    answers = OfflineBackend().explain_examples(_set(f[:20], f[20:40]), None, 5)
    chosen = select_explanation(answers, AGREE, AGREE.default_threshold)
    assert not chosen.clear
    assert sum(r.abstained for r in answers) >= 3  # most subsets find no property at |delta| >= 0.7


def test_dead_feature_and_too_few_examples_abstain():
    f = _pool(3)
    dead = ExampleSet("f3", torch.zeros(0, 3, 64, 64), torch.zeros(0), _images(f[:10]))
    answers = OfflineBackend().explain_examples(dead, None, 3)
    assert [r.abstained for r in answers] == [True] * 3 and "dead feature" in answers[0].text
    left, right = f[f[:, 1] < 0.45][:8], f[f[:, 1] > 0.55][:8]
    few = OfflineBackend().explain_examples(_set(left, right), None, 5)  # 8 firing images: 1-2 per answer
    assert all(r.abstained and r.meta["reason"] == "too few examples" for r in few)
    assert not select_explanation(few, AGREE, AGREE.default_threshold).clear


def test_cliffs_delta_and_circular_hue_by_hand():
    # a = [3, 4], b = [1, 2, 3]: 5 of 6 pairs a > b, one tie -> 5/6
    assert cliffs_delta(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(5 / 6)
    # a = [1, 2, 3], b = [2, 2]: two pairs below, two ties, two above -> 0; NaNs are dropped
    assert cliffs_delta(torch.tensor([1.0, 2.0, 3.0, float("nan")]), torch.tensor([2.0, 2.0])) == 0.0
    nan = torch.full((4,), float("nan"))
    firing = {"x": nan, "y": nan, "area": nan, "compactness": nan, "background": torch.tensor([0.1, 0.2, 0.3, 0.4]),
              "hue": torch.tensor([0.98, 0.99, 0.01, 0.02]), "object": torch.ones(4)}
    other = dict(firing, background=torch.tensor([0.5, 0.6, 0.7, 0.8]), hue=torch.tensor([0.4, 0.5, 0.6, 0.45]))
    sep = contrast_properties(firing, other, min_examples=3)
    assert sep["background"]["delta"] == -1.0 and "x" not in sep  # x undefined everywhere: not compared
    assert sep["hue"]["delta"] == 1.0 and sep["hue"]["colour"] == "red"


def test_example_set_checks_its_shapes():
    with pytest.raises(ValueError, match=r"activations must have shape \(2,\)"):
        ExampleSet("f0", torch.zeros(2, 3, 16, 16), torch.zeros(3), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="maps must be"):
        ExampleSet("f0", torch.zeros(2, 3, 16, 16), torch.zeros(2), torch.zeros(1, 3, 16, 16), maps=torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="inactive must be a"):
        ExampleSet("f0", torch.zeros(2, 3, 16, 16), torch.zeros(2), torch.zeros(3, 16, 16))


class RecordingChat(Backend):
    """A chat-style backend that answers from the prompt only and records what it was sent."""

    name = "recording"

    def __init__(self):
        self.sent = []

    def explain(self, traversal, prompt, n):
        self.sent.append((traversal, prompt, n))
        return [Response(text="f7 fires when the object is on the left.") for _ in range(n)]


def test_chat_backends_get_the_example_grid_and_text():
    k, m, cell = 10, 5, 80
    red, blue = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9])
    firing = red[None, :, None, None].expand(k, 3, 32, 32).clone()
    other = blue[None, :, None, None].expand(m, 3, 32, 32).clone()
    maps = torch.zeros(k, 2, 2)
    maps[:, :, 0] = 1.0  # fires on the left half of every image
    ex = ExampleSet("f7", firing, torch.linspace(1.0, 0.1, k), other, maps=maps)
    prompt = build_example_prompt(ex, max_side=2000)
    backend = RecordingChat()
    answers = backend.explain_examples(ex, prompt, 3)
    assert len(answers) == 3 and len(backend.sent) == 1
    traversal, sent, n = backend.sent[0]
    assert sent is prompt and n == 3 and torch.equal(traversal.images[0, 0], firing)
    assert "f7 fires most" in sent.text and "'does not fire'" in sent.text and sent.text.endswith(EXAMPLES_ABSTAIN)
    assert "The 10 images" in sent.text and "The 5 images" in sent.text and sent.bias == "examples"
    image = np.asarray(sent.images[0])
    row = cell + CAPTION_HEIGHT + GAP
    # 8 per row: 10 firing images take 2 rows, then the non-firing row
    assert image.shape == (3 * row, LABEL_WIDTH + 8 * (cell + GAP), 3)
    x0 = LABEL_WIDTH
    tile = image[:cell, x0:x0 + cell].astype(int)
    # overlay: full colour where the map is 1 (left), dimmed to the 0.25 floor where it is 0 (right)
    assert np.abs(tile[cell // 2, 2] - (red * 255).round().numpy()).max() <= 1
    assert np.abs(tile[cell // 2, cell - 3] - (0.25 * red * 255).round().numpy()).max() <= 1
    second_row = image[row:row + cell, x0 + cell + GAP:x0 + 2 * cell + GAP]  # image 10 of 10
    assert np.abs(second_row[cell // 2, 2].astype(int) - (red * 255).round().numpy()).max() <= 1
    assert (image[row:row + cell, x0 + 2 * (cell + GAP) + 5] == 255).all()  # nothing after the 10th image
    inactive = image[2 * row:2 * row + cell, x0:x0 + cell].reshape(-1, 3).astype(int)
    assert np.abs(inactive - (blue * 255).round().numpy()).max() <= 1  # not dimmed: no map on these
    small = build_example_prompt(ex, max_side=300)
    assert max(small.images[0].size) == 300


def test_the_response_cache_hands_example_sets_to_the_offline_backend(tmp_path):
    from latentexplainer_plugin.cache import CachedBackend, ResponseCache

    f = _pool()
    ex = _set(f[f[:, 1] < 0.45][:12], f[f[:, 1] > 0.55][:12])
    cached = CachedBackend(OfflineBackend(), ResponseCache(tmp_path, enabled=False))
    answers = cached.explain_examples(ex, build_example_prompt(ex), 3)
    assert all({"attribute": "horizontal_position", "direction": "-"} in c for c in _claims(answers))

    class ReadsTraversal(RecordingChat):
        samples_from_bases = True

    with pytest.raises(BackendError, match="implement explain_examples"):
        ReadsTraversal().explain_examples(ex, build_example_prompt(ex), 2)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from latentexplainer_plugin.adapters import VAEAdapter
    from latentexplainer_plugin.attribution import LatentExplainer
    from latentexplainer_plugin.data.shapes import make_dataset
    from latentexplainer_plugin.demo import load_demo_model
    from latentexplainer_plugin.models.conv_vae import images_to_tensor
    from latentexplainer_plugin.report.examples import ExamplesWriter
    from latentexplainer_plugin.run import explain_to_dir
    from latentexplainer_plugin.sae import SAEFeatureAdapter, SparseAutoencoder

    torch.manual_seed(0)
    model = load_demo_model()
    data = make_dataset(300, seed=1, masks=True)
    with torch.no_grad():
        mu = model.encode(images_to_tensor(data["images"]))[0]
    # the x-position latent, found independently: largest |Spearman correlation| with the x factor
    ranks = lambda v: np.argsort(np.argsort(v, axis=0), axis=0).astype(float)  # noqa: E731
    rz, rx = ranks(mu.numpy()), ranks(data["factors"][:, 1])
    corr = [abs(np.corrcoef(rz[:, k], rx)[0, 1]) for k in range(mu.shape[1])]
    k = int(np.argmax(corr))
    d = mu.shape[1]
    axis = SparseAutoencoder(torch.eye(d), torch.zeros(d), torch.eye(d), torch.zeros(d), "standard",
                             apply_b_dec_to_input=False)  # feature j = relu(z_j)
    adapter = SAEFeatureAdapter(VAEAdapter(model), axis, site="decoder.input", features=[k])
    adapter.attach_examples(data["images"], masks=data["masks"], n_top=10, n_quantiles=10, n_contrast=20)
    out = tmp_path_factory.mktemp("run")
    explainer = LatentExplainer(adapter, samples=5)
    results = explain_to_dir(explainer, out, extras=ExamplesWriter(out), progress=False)
    return {"adapter": adapter, "mu": mu, "k": k, "corr": corr[k], "out": out, "results": results}


def test_demo_axis_sae_examples_name_horizontal_position(demo_run):
    assert demo_run["corr"] > 0.8  # the demo VAE has a clean x latent
    entry = demo_run["results"]["latents"][0]
    record = entry["examples"]
    assert record["status"] == "ok" and record["clear"] and record["certainty"] >= 0.8
    assert "object is on the" in record["explanation"]
    claims = [c for r in record["responses"] for c in r.get("claims", [])]
    assert claims and all(c["attribute"] == "horizontal_position" for c in claims)
    # decoder.input holds one vector per image: no activation map, so no IoU against the object masks
    assert record["n_firing"] == 20 and record["n_not_firing"] == 20 and record["iou"] is None
    out = demo_run["out"]
    assert record["image"] == f"examples/{entry['id']}.png" and (out / record["image"]).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())["latents"][0]["examples"]
    assert saved["image"] == record["image"] and saved["explanation"] == record["explanation"]
    assert f"src='{record['image']}'" in (out / "report.html").read_text()


def test_demo_feature_statistics_come_from_the_data(demo_run):
    adapter, mu, k = demo_run["adapter"], demo_run["mu"], demo_run["k"]
    stats = adapter.feature_extras(0)
    act = mu[:, k].clamp_min(0)  # the axis SAE's feature on each image, computed directly
    assert stats["stats_source"] == "data"
    assert stats["frequency"] == pytest.approx(float((act > 0).float().mean()), abs=1e-4)
    assert stats["max"] == pytest.approx(float(act.max()), rel=1e-5)
    ex = adapter.example_set(0)
    assert ex.n_active == 20 and (ex.activations > 0).all()
    top = torch.sort(act, descending=True).values[:10]
    assert torch.allclose(ex.activations[:10], top, rtol=1e-5)  # the 10 strongest images come first
    assert all(float(act[i]) == 0 for i in ex.meta["inactive_items"])


def test_demo_sae_counts_add_up_and_dead_features_are_never_clear(tmp_path):
    from latentexplainer_plugin.cli.demo_sae import run_demo_sae

    torch.manual_seed(0)
    summary = run_demo_sae(tmp_path / "demo", n_features=8, k=2, steps=40, train_images=512, eval_images=300,
                           samples=5)
    counts = summary["counts"]
    assert counts["features"] == 8 and counts["dead"] + counts["live"] == 8
    assert counts["examples clear among dead"] == 0 and counts["steering clear among dead"] == 0
    assert counts["examples clear and name it"] <= counts["examples clear among those"] <= counts["follow a factor"]
    saved = json.loads((tmp_path / "demo" / "sae_demo.json").read_text())
    assert saved["counts"] == counts
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert len(results["latents"]) == 8
    for entry, feature in zip(results["latents"], summary["features"]):
        assert entry["stats_source"] == "data" and entry["dead"] == feature["dead"]
        assert entry["examples"]["image"] == f"examples/{entry['id']}.png"
        if feature["examples"]:  # a clear example explanation names what its claims say
            assert entry["examples"]["clear"] and feature["named"]


def test_demo_sae_train_command(tmp_path, monkeypatch, capsys):
    import functools

    import latentexplainer_plugin.cli.demo_sae as demo_sae
    from latentexplainer_plugin.cli import main

    small = functools.partial(demo_sae.run_demo_sae, n_features=4, k=2, steps=20, train_images=256, eval_images=200)
    monkeypatch.setattr(demo_sae, "run_demo_sae", small)  # the full demo takes minutes; same code, smaller sizes
    assert main(["demo", "--sae", "--out", str(tmp_path / "d"), "--samples", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "features: 4" in printed and "sae_demo.json" in printed
    summary = json.loads((tmp_path / "d" / "sae_demo.json").read_text())
    assert summary["n_features"] == 4 and (tmp_path / "d" / "sae" / "cfg.json").is_file()
    assert (tmp_path / "d" / "report.html").is_file()


def test_attach_examples_refuses_bad_input_before_any_work(demo_run):
    from latentexplainer_plugin.sae.examples import ExamplesError

    adapter = demo_run["adapter"]
    before = adapter._examples
    with pytest.raises(ExamplesError, match=r"images must be \(N, H, W, 3\) uint8"):
        adapter.attach_examples(np.zeros((4, 64, 64, 3), np.float32))
    with pytest.raises(ExamplesError, match="has 300 items but 10 images were given"):
        adapter.attach_examples(np.zeros((10, 64, 64, 3), np.uint8), store=before["store"])
    with pytest.raises(ExamplesError, match="masks must be"):
        adapter.attach_examples(np.zeros((10, 64, 64, 3), np.uint8), masks=np.zeros((10, 32, 32), bool))
    assert adapter._examples is before  # nothing replaced


def test_to_example_set_stacks_maps_and_scores_iou(tmp_path):
    from torch import nn

    from latentexplainer_plugin.sae import SparseAutoencoder
    from latentexplainer_plugin.sae.collect import ActivationStore, collect_activations
    from latentexplainer_plugin.sae.examples import example_set, index_examples, to_example_set

    n = 12
    maps = torch.zeros(n, 2, 2, 2)  # items, features, H, W
    for i in range(6):
        maps[i, 0, 0, 0] = float(i + 1)  # feature 0 fires in the top-left cell of items 0..5 only
    collect_activations(nn.Identity(), "", [maps[:6], maps[6:]], tmp_path / "c")
    store = ActivationStore(tmp_path / "c")
    sae = SparseAutoencoder(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2), "standard",
                            apply_b_dec_to_input=False)
    index = index_examples(sae, store, top_k=3, reservoir=8, contrast=4)
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, :2, :2] = 200
    masks = np.zeros((n, 4, 4), bool)
    masks[:, :2, :2] = True  # the object is where the feature fires: IoU 1 (2x2 -> 4x4 keeps the quadrant)
    ex, amaps = example_set(sae, store, index, 0, n_top=3, n_quantiles=2, n_contrast=4)
    s = to_example_set(ex, images, amaps, masks=masks)
    assert s.activations[:3].tolist() == [1.5, 1.25, 1.0]  # items 5, 4, 3: their cell value / 4 positions
    assert s.meta["items"][:3] == [5, 4, 3] and s.meta["groups"][:3] == ["top"] * 3
    assert s.maps.shape == (s.n_active, 2, 2) and float(s.maps[0, 0, 0]) == 6.0 and s.meta["iou"] == 1.0
    assert s.n_inactive == 4 and set(s.meta["inactive_items"]) <= set(range(6, 12))
    assert s.activating.shape[1:] == (3, 4, 4) and float(s.activating[0, 0, 0, 0]) == pytest.approx(200 / 255)
    masks[:, :2, :2], masks[:, 2:, 2:] = False, True  # the object elsewhere: no overlap
    assert to_example_set(ex, images, amaps, masks=masks).meta["iou"] == 0.0
