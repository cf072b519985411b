"""SAE features of the demo VLM at image tokens: attribute following, the steering edit, per-image means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentexplainer_plugin.data.shapes import make_dataset
from latentexplainer_plugin.errors import VLMError
from latentexplainer_plugin.sae.model import SparseAutoencoder
from latentexplainer_plugin.vlm import WEIGHTS_DIR, load_demo_vlm
from latentexplainer_plugin.vlm.activations import collect_image_token_activations
from latentexplainer_plugin.vlm.features import (caption_changes, correlation_ratio, feature_image_means,
                                                 feature_region_means, followed_attribute, steering_hook)
from latentexplainer_plugin.vlm.lens import image_inputs, image_token_id, language_model


@pytest.fixture(scope="module")
def vlm():
    return load_demo_vlm(WEIGHTS_DIR)


def _sae(d_in: int = 64, d_sae: int = 8, seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    return SparseAutoencoder(W_enc=torch.randn(d_in, d_sae, generator=g) / 4, b_enc=torch.zeros(d_sae),
                             W_dec=torch.randn(d_sae, d_in, generator=g), b_dec=torch.zeros(d_in), architecture="standard")


def test_correlation_ratio_by_hand():
    # groups a: [1, 3] (mean 2), b: [5, 7] (mean 6); grand mean 4; between 2*4 + 2*4 = 16; total 9+1+1+9 = 20
    assert correlation_ratio(np.array([1.0, 3.0, 5.0, 7.0]), ["a", "a", "b", "b"]) == pytest.approx(0.8)
    assert correlation_ratio(np.array([2.0, 2.0, 2.0]), ["a", "b", "c"]) == 0.0
    words = [{"size": s, "colour": c, "shape": "square", "vertical": "top", "horizontal": "left", "background": "dark"}
             for s, c in [("small", "red"), ("large", "red"), ("small", "blue"), ("large", "blue")]]
    follows, eta = followed_attribute(np.array([0.0, 0.1, 1.0, 1.1]), words, 0.3)
    assert follows == "colour" and eta["colour"] > 0.99 and eta["size"] < 0.01
    assert followed_attribute(np.array([0.0, 0.1, 1.0, 1.1]), words, 0.999)[0] is None


def test_caption_changes_counts_changed_words_per_attribute():
    before = ["a small red square near the top left on a dark background"] * 2
    after = ["a small blue square near the top left on a dark background",
             "a large red square near the top left on a dark background"]
    changes = caption_changes(before, after)
    assert changes["colour"] == 0.5 and changes["size"] == 0.5 and changes["shape"] == 0.0


def test_steering_edit_matches_the_formula_at_image_tokens_only(vlm):
    model, processor = vlm
    sae = _sae()
    images = make_dataset(2, seed=3)["images"]
    inputs = image_inputs(processor, list(images))
    positions = inputs["input_ids"] == image_token_id(model, processor)
    layer = language_model(model).layers[0]
    seen = {}

    def record(_m, _a, output):
        seen["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = layer.register_forward_hook(record)
    with torch.inference_mode():
        model(**inputs)
    plain = seen["out"]
    target, feature = 3.5, 2
    edit = layer.register_forward_hook(steering_hook(sae, feature, target, positions))
    handle.remove()
    handle = layer.register_forward_hook(record)  # runs after the edit: sees the edited output
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        edit.remove()
        handle.remove()
    edited = seen["out"]
    # reference written out: h + (target - relu(h W_enc + b_enc)_k) * W_dec[k] at image tokens, h elsewhere
    h = plain[positions]
    f_k = torch.relu(h @ sae.W_enc[:, feature] + sae.b_enc[feature])
    expected = plain.clone()
    expected[positions] = h + (target - f_k)[:, None] * sae.W_dec[feature]
    assert torch.allclose(edited, expected, atol=1e-5)
    assert torch.equal(edited[~positions], plain[~positions])
    with pytest.raises(VLMError, match="out of range"):
        steering_hook(sae, 8, 1.0, positions)
    with pytest.raises(VLMError, match="finite"):
        steering_hook(sae, 0, float("nan"), positions)


def test_feature_image_means_equal_a_direct_encode(vlm, tmp_path):
    model, processor = vlm
    images = make_dataset(5, seed=4)["images"]
    collect_image_token_activations(model, processor, images, 1, tmp_path / "acts", shard_rows=100)
    sae = _sae(seed=1)
    means = feature_image_means(sae, tmp_path / "acts")
    # reference: a plain forward hook on the same layer, image tokens picked by id
    seen = {}
    layer = language_model(model).layers[1]
    handle = layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", (out[0] if isinstance(out, tuple) else out).detach()))
    inputs = image_inputs(processor, list(images))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        handle.remove()
    mask = inputs["input_ids"] == image_token_id(model, processor)
    per_token = torch.stack([sae.encode(seen["h"][b][mask[b]]) for b in range(5)])  # (5, 64, d_sae)
    assert torch.allclose(means, per_token.mean(1), atol=1e-5)
    g = np.random.default_rng(0)
    regions = {"a": g.random((5, 64)) < 0.3, "b": g.random((5, 64)) < 0.6}
    got = feature_region_means(sae, tmp_path / "acts", regions)
    for name, m in regions.items():
        assert torch.allclose(got[name], per_token[torch.from_numpy(m)].mean(0), atol=1e-5)
