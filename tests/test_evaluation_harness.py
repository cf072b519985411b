"""The evaluation harness: factor judge, metrics on hand-built tables, held-out thresholds,
calibration round trip, the `evaluate` CLI end to end, the second dataset, and (when the demo
weights exist) the issue's acceptance target on the shipped demo model."""

import json

import numpy as np
import pytest

from latentexplainer_plugin.cli import main
from latentexplainer_plugin.data.shapes import AREA_MATCH, FACTOR_NAMES, ShapesSpec, _inside, make_dataset
from latentexplainer_plugin.evaluation import calibration, harness
from latentexplainer_plugin.evaluation.calibration import cross_validated_thresholds
from latentexplainer_plugin.store import read_results
from latentexplainer_plugin.uncertainty import calibrate_threshold


@pytest.fixture(autouse=True)
def _no_user_calibration(monkeypatch, tmp_path):
    """Never read or write the real ~/.config: every test gets its own config home."""
    monkeypatch.delenv(calibration.THRESHOLDS_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


# ------------------------------------------------------------------------------------ datasets


def test_area_match_equalises_every_shape():
    n = 1200
    g = (np.arange(n) + 0.5) / n * 2 - 1
    u, v = np.meshgrid(g, g)
    s = np.full_like(u, 0.4)
    for shape in AREA_MATCH:
        area = _inside(shape, u, v, s, 0.5).mean() * 4 / 0.4**2  # in units of s^2
        assert area == pytest.approx(2.4, rel=0.01), shape


def test_shapes2_differs_from_the_demo_data():
    from latentexplainer_plugin.data import shapes2

    d = shapes2.make_dataset(32, seed=1)
    assert d["images"].shape == (32, 64, 64, 3) and d["images"].dtype == np.uint8
    assert list(d["factor_names"]) == list(FACTOR_NAMES) and d["factors"].shape == (32, 7)
    assert set(d["shape_names"]) == {"diamond", "cross", "ring"}
    # the background is a gradient (top brighter than bottom) with a warm tint (red > blue)
    corners = d["images"][:, [0, -1], 0, :].astype(float)  # (N, top/bottom, 3)
    assert (corners[:, 0].mean(1) > corners[:, 1].mean(1)).mean() > 0.9
    assert (corners[:, 0, 0] >= corners[:, 0, 2]).all()
    lo, hi = shapes2.SHAPES2.scale_range
    assert lo <= d["factors"][:, 3].min() and d["factors"][:, 3].max() <= hi
    assert shapes2.SHAPES2.scale_range != ShapesSpec().scale_range


def test_make_data_shapes2(tmp_path, capsys):
    assert main(["make-data", "--dataset", "shapes2", "--n", "8", "--out", str(tmp_path / "s2.npz")]) == 0
    with np.load(tmp_path / "s2.npz") as f:
        assert f["images"].shape == (8, 64, 64, 3) and "ring" in list(f["shape_names"])


# --------------------------------------------------------------------------------------- judge

HAND_WRITTEN = {
    "shape": ["The square gradually turns into a circle.", "Its outline changes from angular to round."],
    "x_position": ["The object slides towards the right edge of the frame.", "It shifts horizontally to the left."],
    "y_position": ["The object rises toward the top of the image.", "The shape drops down to the bottom."],
    "scale": ["The object grows bigger.", "It shrinks to a small dot."],
    "rotation": ["The object spins clockwise.", "It tilts to the left, turning about its centre."],
    "hue": ["The colour changes from blue to red.", "The object turns from green to purple."],
    "background": ["The backdrop gets lighter.", "The background fades from dark grey to light grey."],
    "no_change": ["No visible change.", "Nothing changes between the frames.", "I cannot see any difference."],
}


@pytest.fixture(scope="module")
def judge():
    from latentexplainer_plugin.evaluation.judge import FactorJudge

    return FactorJudge(FACTOR_NAMES)


def test_judge_names_each_factor_from_hand_written_explanations(judge):
    texts = [(f, t) for f, ts in HAND_WRITTEN.items() for t in ts]
    verdicts = judge.judge_many([t for _, t in texts])
    wrong = [(f, t, v.factor) for (f, t), v in zip(texts, verdicts) if not v.names(f)]
    assert not wrong


def test_judge_reads_the_frame_clauses_and_diagonals(judge):
    v = judge.judge("Increasing z2 makes the object smaller and moves it from left to right.")
    assert v.factor == "scale" and v.named == ("scale", "x_position")  # leads with the main change
    v = judge.judge("Increasing z7 moves the object diagonally from top left to bottom right.")
    assert v.names("x_position") and v.names("y_position")
    assert judge.judge("As z3 increases, the background becomes darker.").factor == "background"


def test_judge_falls_back_to_factor_names():
    from latentexplainer_plugin.evaluation.judge import FactorJudge

    j = FactorJudge(["light_angle", "scale"])
    assert j.descriptions["light_angle"][0] == "light angle"
    with pytest.raises(ValueError, match="judge's own class"):
        FactorJudge(["no_change"])


# -------------------------------------------------------------------------------------- metrics

# (active, captured factor, clear, explanation names it, certainty)
TABLE = [
    (True, "x_position", True, True, 0.9),
    (True, "y_position", True, False, 0.8),  # clear, wrong factor
    (True, "scale", False, True, 0.3),  # right words but not clear: a miss
    (True, "hue", True, True, 0.6),
    (False, None, False, None, 0.0),  # collapsed
    (True, None, True, None, 0.7),  # active, captures nothing, but clear: a false alarm
    (False, None, False, None, 0.3),
]
ROWS = [dict(active=a, factor=f, clear=c, correct=r, certainty=s) for a, f, c, r, s in TABLE]


def test_factor_accuracy_on_a_hand_built_table():
    assert harness.factor_accuracy(ROWS) == pytest.approx(2 / 4)
    assert harness.factor_accuracy([r for r in ROWS if r["factor"] is None]) is None


def test_abstention_auroc_matches_a_hand_count_of_pairs():
    # positives (capture a factor) 0.9 0.8 0.3 0.6; negatives 0.0 0.7 0.3. Pairs won (tie = 1/2):
    # 0.9: 3, 0.8: 3, 0.3: 1 + 0.5 (tie with 0.3), 0.6: 2  ->  9.5 of 4 * 3 = 12 pairs
    assert harness.abstention_auroc(ROWS) == pytest.approx(9.5 / 12)
    assert harness.abstention_auroc([r for r in ROWS if r["factor"]]) is None  # one class: undefined
    acc = harness.abstention_accuracy(ROWS)
    # clear vs label: right on x, y, hue, both collapsed -> 5/7; TPR 3/4, TNR 2/3
    assert acc["accuracy"] == pytest.approx(5 / 7)
    assert acc["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_cross_validated_threshold_never_uses_the_scored_item(monkeypatch):
    certs = [0.10, 0.20, 0.35, 0.40, 0.55, 0.60, 0.80, 0.90]
    labels = [False, False, True, False, True, False, True, True]
    in_sample = calibrate_threshold(certs, labels)
    import latentexplainer_plugin.uncertainty as U

    calls = []
    real = U.calibrate_threshold

    def spy(c, y):
        calls.append(list(c))
        return real(c, y)

    monkeypatch.setattr(U, "calibrate_threshold", spy)
    cv = cross_validated_thresholds(certs, labels)
    assert cv.scheme == "leave-one-out" and len(calls) == len(certs)
    for i, (seen, t) in enumerate(zip(calls, cv.thresholds)):
        assert certs[i] not in seen and len(seen) == len(certs) - 1
        assert t == real(certs[:i] + certs[i + 1:], labels[:i] + labels[i + 1:])
    # the construction makes the held-out choice differ from the in-sample one for some items
    assert any(t != in_sample for t in cv.thresholds)
    # in-sample thresholds would score this item set better than held-out ones do
    def acc(ts):
        return np.mean([(c >= t) == y for c, t, y in zip(certs, ts, labels)])
    assert acc([in_sample] * len(certs)) > acc(cv.thresholds)


def test_cross_validation_across_models_leaves_a_whole_model_out():
    certs = [0.2, 0.8, 0.3, 0.9, 0.1, 0.6]
    labels = [False, True, False, True, False, True]
    groups = ["a", "a", "b", "b", "c", "c"]
    cv = cross_validated_thresholds(certs, labels, groups=groups)
    assert cv.scheme == "leave-one-group-out"
    assert cv.thresholds[0] == cv.thresholds[1] == calibrate_threshold(certs[2:], labels[2:])
    one_class = cross_validated_thresholds([0.1, 0.9], [False, True], groups=["a", "b"], fallback=0.42)
    assert one_class.thresholds == [0.42, 0.42] and one_class.fallbacks == 2


# ---------------------------------------------------------------------------------- calibration


def _fake_evaluation(path, certs, labels, backend="offline"):
    latents = []
    for i, (c, y) in enumerate(zip(certs, labels)):
        m = {"certainty": c, "candidate": "x" if c else None, "clear": c >= 0.5, "correct": bool(y) if y else None}
        latents.append({"id": f"z{i}", "index": i, "label": y, "active": True, "factor": "scale" if y else None,
                        "measures": {"embed": dict(m), "bow": dict(m)}})
    ev = {"schema": "latentexplainer-evaluation", "schema_version": 1, "model": str(path), "backend": {"name": backend},
          "similarities": ["embed", "bow"], "latents": latents,
          "metrics": {"by_similarity": {"embed": {"threshold": 0.5}, "bow": {"threshold": 0.5}}}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "evaluation.json").write_text(json.dumps(ev))
    return ev


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-eval")
    np.savez(root / "data.npz", **make_dataset(64, ShapesSpec(size=16), seed=3))
    code = main(["train-vae", "--data", str(root / "data.npz"), "--out", str(root / "model"), "--steps", "8",
                 "--latents", "3", "--batch-size", "8", "--quiet"])
    assert code == 0
    return root


def test_calibrate_round_trip_is_picked_up_by_explain(tmp_path, tiny, capsys):
    a = _fake_evaluation(tmp_path / "run_a", [0.9, 0.7, 0.35, 0.2, 0.05], [True, True, False, False, False])
    b = _fake_evaluation(tmp_path / "run_b", [0.8, 0.45, 0.3, 0.1], [True, True, False, False])
    assert main(["calibrate", "--runs", str(tmp_path / "run_a"), str(tmp_path / "run_b")]) == 0
    path = tmp_path / "config" / "latentexplainer" / "thresholds.json"
    saved = json.loads(path.read_text())["thresholds"]["offline"]
    pooled = [l["measures"]["bow"]["certainty"] for l in a["latents"] + b["latents"]]
    labels = [l["label"] for l in a["latents"] + b["latents"]]
    expected = calibrate_threshold(pooled, labels)
    assert saved["bow"]["threshold"] == pytest.approx(expected) and saved["embed"]["n"] == 9
    assert saved["bow"]["held_out"]["scheme"] == "leave-one-group-out"
    assert str(path) in capsys.readouterr().out

    from latentexplainer_plugin.attribution import LatentExplainer
    from latentexplainer_plugin.models.conv_vae import ConvVAE, ConvVAEConfig

    vae = ConvVAE(ConvVAEConfig(latent_dim=2, image_size=16, width=8, hidden=16)).eval()
    info = LatentExplainer(vae, similarity="bow").describe()
    assert info["threshold"] == pytest.approx(expected) and info["threshold_source"] == f"calibrated: {path}"
    assert LatentExplainer(vae, similarity="bow", threshold=0.3).describe()["threshold_source"] == "argument"

    out = tmp_path / "explained"
    assert main(["explain", "--model", str(tiny / "model"), "--out", str(out), "--samples", "2",
                 "--similarity", "bow", "--quiet"]) == 0
    settings = read_results(out / "results.json")["settings"]
    assert settings["threshold"] == pytest.approx(expected)
    assert settings["threshold_source"] == f"calibrated: {path}"

    # --out writes elsewhere; the per-similarity default stays when no calibration exists
    other = tmp_path / "elsewhere.json"
    assert main(["calibrate", "--runs", str(tmp_path / "run_a"), "--out", str(other)]) == 0
    assert json.loads(other.read_text())["thresholds"]["offline"]["embed"]["held_out"]["scheme"] == "leave-one-out"
    path.unlink()
    info = LatentExplainer(vae, similarity="embed").describe()
    assert info["threshold"] == pytest.approx(0.56) and info["threshold_source"] == "default (embed)"


def test_calibrate_refuses_runs_without_both_classes(tmp_path, capsys):
    _fake_evaluation(tmp_path / "r", [0.9, 0.8], [True, True])
    assert main(["calibrate", "--runs", str(tmp_path / "r")]) == 2
    assert "calibration needs latents that capture a factor and latents that capture none" in capsys.readouterr().err
    assert main(["calibrate", "--runs", str(tmp_path / "missing")]) == 2


def test_pooled_metrics_score_each_model_with_a_threshold_from_the_others(tmp_path):
    a = _fake_evaluation(tmp_path / "a", [0.9, 0.7, 0.35, 0.2], [True, True, False, False])
    b = _fake_evaluation(tmp_path / "b", [0.8, 0.6, 0.65, 0.1], [True, True, False, False])
    pooled = harness.pooled_metrics([a, b])
    cv = pooled["embed"]["cv"]
    assert cv["scheme"] == "leave-one-group-out (models)"
    assert cv["thresholds_per_model"][str(tmp_path / "a")] == pytest.approx(calibrate_threshold([0.8, 0.6, 0.65, 0.1], [True, True, False, False]))
    assert pooled["embed"]["auroc"] == pytest.approx(harness.abstention_auroc(
        [{"factor": f, "certainty": c} for f, c in zip(["s", "s", None, None] * 2, [0.9, 0.7, 0.35, 0.2, 0.8, 0.6, 0.65, 0.1])]))


# ------------------------------------------------------------------------------- evaluate, CLI

EVAL_KEYS = {"schema", "schema_version", "model", "data", "n_images", "factor_names", "backend", "samples", "seed",
             "similarity", "threshold", "threshold_source", "similarities", "judge", "latents", "metrics", "timing"}
LATENT_KEYS = {"id", "index", "status", "kl", "active", "factor", "factor_score", "factor_scores", "label",
               "explanation", "certainty", "clear", "named_factor", "correct", "measures"}
MEASURE_KEYS = {"certainty", "candidate", "clear", "judged", "named_factor", "correct"}
METRIC_KEYS = {"n_latents", "n_failed", "n_active", "n_aligned", "factor_accuracy", "abstention_auroc",
               "by_similarity", "disentanglement"}
BY_SIM_KEYS = {"threshold", "threshold_source", "auroc", "factor_accuracy", "accuracy", "balanced_accuracy",
               "n_clear", "cv", "reference_metrics"}


@pytest.fixture(scope="module")
def evaluated(tiny):
    """The same evaluation twice: once by the CLI, once by the Python API."""
    model, data = str(tiny / "model"), str(tiny / "data.npz")
    code = main(["evaluate", "--model", model, "--data", data, "--out", str(tiny / "eval1"),
                 "--samples", "2", "--similarity", "bow", "--seed", "7", "--quiet"])
    assert code == 0
    harness.evaluate(model, data, tiny / "eval2", samples=2, similarity="bow", seed=7)
    return [tiny / "eval1", tiny / "eval2"]


def test_evaluate_cli_writes_the_documented_files_and_keys(evaluated):
    out = evaluated[0]
    for name in ("results.json", "report.html", "evaluation.json", "evaluation.md", "roc.png"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads((out / "evaluation.json").read_text())
    assert EVAL_KEYS <= set(ev) and ev["schema"] == "latentexplainer-evaluation"
    assert ev["similarity"] == "bow" and ev["similarities"] == ["bow", "agree", "embed"] and ev["seed"] == 7
    assert ev["backend"]["name"] == "offline" and ev["factor_names"] == list(FACTOR_NAMES)
    assert [e["id"] for e in ev["latents"]] == ["z0", "z1", "z2"]
    results = read_results(out / "results.json")
    for e, r in zip(ev["latents"], results["latents"]):
        assert LATENT_KEYS <= set(e) and set(e["measures"]) == {"bow", "agree", "embed"}
        assert e["label"] == (e["factor"] is not None)
        for m in e["measures"].values():
            assert MEASURE_KEYS <= set(m) and 0.0 <= m["certainty"] <= 1.0
        # the run's own measure recomputed from the stored responses gives the stored certainty
        assert e["measures"]["bow"]["certainty"] == pytest.approx(r["certainty"], abs=1e-6)
        assert e["measures"]["bow"]["clear"] == r["clear"]
    m = ev["metrics"]
    assert METRIC_KEYS <= set(m) and set(m["by_similarity"]) == {"bow", "agree", "embed"}
    for sim, b in m["by_similarity"].items():
        assert BY_SIM_KEYS <= set(b)
        assert len(b["cv"]["thresholds"]) == 3
        for key in ("bleu", "rouge_l", "cider", "meteor", "spice", "bertscore"):
            value = b["reference_metrics"][key]
            assert isinstance(value, float) or (value["unavailable"] is True and value["reason"])
    assert m["by_similarity"]["bow"]["threshold_source"] == "default (bow)"
    assert m["by_similarity"]["embed"]["threshold"] == pytest.approx(0.56)
    d = m["disentanglement"]
    assert set(d) >= {"mig", "dci", "sap", "n_images"} and set(d["dci"]) >= {"disentanglement", "completeness"}
    md = (out / "evaluation.md").read_text()
    assert "factor_accuracy" in md and "| metric | bow | agree | embed |" in md and "z2" in md


def test_evaluate_is_reproducible_with_a_fixed_seed(evaluated):
    a, b = (json.loads((d / "evaluation.json").read_text()) for d in evaluated)
    assert a["metrics"] == b["metrics"] and a["latents"] == b["latents"]
    assert (a["model"], a["data"], a["seed"]) == (b["model"], b["data"], b["seed"])


def test_evaluate_needs_factors(tiny, tmp_path, capsys):
    np.savez(tmp_path / "plain.npz", images=make_dataset(4, ShapesSpec(size=16))["images"])
    assert main(["evaluate", "--model", str(tiny / "model"), "--data", str(tmp_path / "plain.npz"),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "factors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------ the acceptance


@pytest.mark.slow
def test_demo_model_meets_the_acceptance_target(tmp_path):
    from latentexplainer_plugin.demo import WEIGHTS_DIR, demo_data, load_demo_model

    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        pytest.skip("demo weights not built")
    ev = harness.evaluate(load_demo_model(), demo_data(1000), tmp_path / "demo", model_name="demo")
    m = ev["metrics"]
    assert m["factor_accuracy"] >= 0.9, harness.summary_lines(ev)
    assert m["abstention_auroc"] >= 0.95, harness.summary_lines(ev)


def test_false_clear_rate_counts_clear_latents_that_capture_nothing():
    from latentexplainer_plugin.evaluation.harness import false_clear_rate

    rows = [{"label": False, "clear": True}, {"label": False, "clear": False}, {"label": False, "clear": False},
            {"label": False, "clear": True}, {"label": True, "clear": True}]
    assert false_clear_rate(rows) == pytest.approx(2 / 4)
    assert false_clear_rate([{"label": True, "clear": True}]) is None  # no negatives: undefined, not 0
    assert false_clear_rate([{"factor": None, "clear": False}]) == 0.0  # label from "factor" when absent
