"""``latentexplainer demo-vlm``: caption accuracy and the three lenses per layer on the shipped demo VLM."""

from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest

from latentexplainer_plugin.cli import main
from latentexplainer_plugin.data.shapes import make_dataset
from latentexplainer_plugin.sae import load_sae
from latentexplainer_plugin.vlm import factor_words
from latentexplainer_plugin.vlm.demo import LENS_SEED
from latentexplainer_plugin.vlm.lens_compare import LENSES, OBJECT_ATTRIBUTES


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-vlm")
    code = main(["demo-vlm", "--out", str(out), "--caption-images", "40", "--lens-images", "12", "--bank-captions", "150",
                 "--sae-features", "16", "--sae-steps", "40", "--feature-train-images", "40", "--feature-images", "24"])
    return code, out


def test_demo_vlm_writes_results_report_and_plot(demo_run):
    code, out = demo_run
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == "demo-vlm" and data["schema"] == 1
    assert (out / "lenses.png").stat().st_size > 1000
    report = (out / "report.html").read_text()
    assert 'src="lenses.png"' in report and "LatentLens" in report and "Caption accuracy" in report
    # the shipped model captions colour and background almost always right (0.988 / 0.992 on 500 images)
    acc = data["captions"]["accuracy"]
    assert acc["colour"]["accuracy"] >= 0.85 > acc["colour"]["chance"]
    assert acc["background"]["accuracy"] >= 0.85
    assert f"{acc['colour']['accuracy']:.3f}" in report


def test_lens_counts_and_chance_match_the_renderer(demo_run):
    _, out = demo_run
    lenses = json.loads((out / "results.json").read_text())["lenses"]
    held = make_dataset(12, seed=LENS_SEED, masks=True)
    # object patches: 8x8 patches at least half covered by the object, counted here with numpy
    cover = held["masks"].reshape(12, 8, 8, 8, 8).mean(axis=(2, 4))
    assert lenses["counts"]["object_patches"] == int((cover >= 0.5).sum())
    assert lenses["counts"]["background_patches"] == int((cover == 0).sum())
    assert [row["layer"] for row in lenses["layers"]] == [0, 1, 2]  # embedding output + 2 decoder layers
    # chance of "a true word among 5 drawn from the bank's words", computed by hand per object patch
    words = factor_words(held["factors"])
    v = lenses["counts"]["bank_words"]
    rates = [1 - comb(v - len({w[a] for a in OBJECT_ATTRIBUTES}), 5) / comb(v, 5)
             for i, w in enumerate(words) for _ in range(int((cover[i] >= 0.5).sum()))]
    assert lenses["chance"]["object"]["any"] == pytest.approx(float(np.mean(rates)), abs=1e-9)
    for row in lenses["layers"]:
        for part in ("object", "background"):
            for lens in LENSES:
                r = row[part][lens]
                assert 0.0 <= r["strict"] <= r["any"] <= 1.0


def test_demo_vlm_sae_features_are_accounted_for(demo_run):
    _, out = demo_run
    data = json.loads((out / "results.json").read_text())
    features = data["features"]
    sae = load_sae(out / "sae")  # written in SAELens layout
    assert (sae.d_in, sae.d_sae) == (64, 16)
    rows = features["features"]
    assert [r["feature"] for r in rows] == list(range(16))  # every feature has a row: none hidden
    s = features["summary"]
    assert s["dead"] + s["live"] == 16 and s["dead"] == sum(r["dead"] for r in rows)
    assert s["follow_an_attribute"] == sum(1 for r in rows if r.get("follows"))
    for r in rows:
        if r["dead"]:
            assert r["follows"] is None and "steering" not in r
            continue
        best = max(r["eta2"], key=r["eta2"].get)
        assert r["follows"] == (best if r["eta2"][best] >= features["follow_eta2"] else None)
        assert r["iou"] is None or 0.0 <= r["iou"] <= 1.0
        assert set(r["steering"]["changes"]) == set(r["eta2"])
        ex = r["examples"]
        assert (ex["explanation"] is not None) == ex["clear"] and len(ex["answers"]) == 5
        assert ex["names_followed"] == bool(ex["clear"] and r["follows"] in ex["attributes"])
    live = [r for r in rows if not r["dead"]]
    assert s["examples_clear_among_followers"] == sum(r["examples"]["clear"] for r in live if r["follows"])
    assert s["examples_clear_among_non_followers"] == sum(r["examples"]["clear"] for r in live if not r["follows"])
    # the demo VLM explains its own features from the same examples (captions, hf caption_compare mode)
    for r in live:
        own = r["self_examples"]
        assert (own["explanation"] is not None) == own["clear"] and len(own["answers"]) == 5
        assert own["names_followed"] == bool(own["clear"] and r["follows"] in own["attributes"])
        assert own["clear"] or own["attributes"] == []
    assert s["self_examples_clear_among_followers"] == sum(r["self_examples"]["clear"] for r in live if r["follows"])
    assert s["self_examples_clear_among_non_followers"] == sum(r["self_examples"]["clear"] for r in live
                                                               if not r["follows"])
    assert s["self_examples_naming_the_followed_attribute"] == sum(r["self_examples"]["names_followed"] for r in live)
    assert s["self_and_offline_agree"] == sum(
        bool(set(r["examples"]["attributes"]) & set(r["self_examples"]["attributes"])) for r in live)
    assert "explained by the VLM itself (captions)" in (out / "report.html").read_text()
    assert "SAE features at model.language_model.layers.0.output" in (out / "report.html").read_text()


def test_demo_vlm_bad_input_is_refused_before_loading(tmp_path, capsys):
    assert main(["demo-vlm", "--out", str(tmp_path / "o"), "--lens-images", "0"]) == 2
    assert "--lens-images must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["demo-vlm", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["demo-vlm", "--out", str(tmp_path / "o"), "--sae-features", "-1"]) == 2
    assert "--sae-features must be an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()
