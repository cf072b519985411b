"""Tests of the metric layer: factor matching, disentanglement metrics and text reference metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from latentexplainer_plugin.evaluation import disentanglement as dis
from latentexplainer_plugin.evaluation import factors as fac
from latentexplainer_plugin.evaluation import text_metrics as tm

# ------------------------------------------------------------------------------------ constructed codes

N, K = 1000, 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    f = rng.uniform(size=(N, K))
    identity = f + 1e-3 * rng.normal(size=f.shape)
    q, r = np.linalg.qr(rng.normal(size=(K, K)))
    rotation = q * np.sign(np.diag(r))  # a random orthogonal matrix
    rotated = f @ rotation
    duplicated = np.column_stack([identity[:, 0], f[:, 0] + 1e-3 * rng.normal(size=N), identity[:, 1:]])
    noise = rng.normal(size=(N, K))
    return {"f": f, "identity": identity, "rotated": rotated, "duplicated": duplicated, "noise": noise}


@pytest.fixture(scope="module")
def dci_identity(data):
    return dis.dci(data["identity"], data["f"])


# ------------------------------------------------------------------------------------------- factors.py


def test_discretize_equal_width_and_discrete_columns():
    first = np.sort(np.concatenate([[0.0, 1.0], (np.arange(100) + 0.5) / 100]))  # no value on an inner edge
    x = np.column_stack([first, np.tile([3.0, 7.0, 5.0], 34)[:102]])
    d = fac.discretize(x, bins=10)
    assert d.shape == x.shape and d.dtype.kind == "i"
    assert d[:, 0].min() == 0 and d[:, 0].max() == 9
    assert np.all(np.diff(d[:, 0]) >= 0)  # monotone
    assert np.bincount(d[:, 0]).tolist() == [11] + [10] * 8 + [11]  # equal widths; min and max inside
    assert set(d[:, 1].tolist()) == {0, 1, 2}  # few unique values: their ranks
    assert (d[x[:, 1] == 7.0, 1] == 2).all()
    assert fac.discretize(np.linspace(0, 1, 50), bins=5).shape == (50,)


def test_mutual_info_and_entropy(data):
    mi = fac.mutual_info_matrix(data["identity"], data["f"])
    assert mi.shape == (K, K)
    h = fac.factor_entropies(data["f"])
    assert np.all(np.diag(mi) > 0.9 * h)
    assert np.all(mi[~np.eye(K, dtype=bool)] < 0.15 * h.max())
    levels = np.tile(np.arange(4.0), 250)
    assert fac.factor_entropies(levels)[0] == pytest.approx(math.log(4))


def test_captured_factors(data):
    codes = np.column_stack([data["identity"][:, [2, 0]], data["noise"][:, 0]])
    matches = fac.captured_factors(codes, data["f"], ["x", "y", "scale"], min_score=0.3)
    assert [m.factor for m in matches] == ["scale", "x", None]
    assert all(m.metric == "normalized_mutual_info" for m in matches)
    assert matches[0].score > 0.8 and matches[0].scores["scale"] == matches[0].score
    assert set(matches[2].scores) == {"x", "y", "scale"} and matches[2].score < 0.3
    with pytest.raises(ValueError):
        fac.captured_factors(codes, data["f"], ["x", "y"])


# ------------------------------------------------------------------------------------ disentanglement.py


def test_identity_code_scores_high(data, dci_identity):
    assert dis.mig(data["identity"], data["f"])["mig"] > 0.8
    assert dci_identity["disentanglement"] > 0.8
    assert dci_identity["completeness"] > 0.8
    assert dci_identity["informativeness"] > 0.9
    assert dis.sap(data["identity"], data["f"])["sap"] > 0.8


def test_rotated_code_is_entangled(data, dci_identity):
    assert dis.mig(data["rotated"], data["f"])["mig"] < 0.3
    d = dis.dci(data["rotated"], data["f"])
    assert d["disentanglement"] < dci_identity["disentanglement"] - 0.3
    assert d["informativeness"] > 0.8  # still informative, only mixed
    # (a random rotation can come out nearly axis-aligned, hence the fixed seed; the Hadamard
    # rotation mixes every factor equally into every code, whatever the data)
    f4 = np.random.default_rng(2).uniform(size=(N, 4))
    hadamard = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
    assert dis.mig(f4 @ hadamard, f4)["mig"] < 0.1
    assert dis.sap(f4 @ hadamard, f4)["sap"] < 0.1


def test_duplicated_factor_lowers_completeness(data, dci_identity):
    d = dis.dci(data["duplicated"], data["f"])
    assert d["completeness"] < dci_identity["completeness"] - 0.1
    assert d["disentanglement"] > 0.8  # each code still serves one factor
    assert dis.mig(data["duplicated"], data["f"])["mig"] < 0.8  # factor 0 has no gap


def test_noise_code_is_uninformative(data):
    d = dis.dci(data["noise"], data["f"])
    assert d["informativeness"] < 0.1
    assert dis.mig(data["noise"], data["f"])["mig"] < 0.1
    assert dis.sap(data["noise"], data["f"])["sap"] < 0.1


def test_discrete_factors():
    rng = np.random.default_rng(1)
    f = rng.integers(0, 4, size=(600, 2)).astype(float)
    codes = f + 0.1 * rng.normal(size=f.shape)
    assert dis.infer_discrete(f) == [True, True]
    assert dis.mig(codes, f)["mig"] > 0.8
    d = dis.dci(codes, f, discrete=[True, True])
    assert d["informativeness"] > 0.9 and d["disentanglement"] > 0.8
    # balanced accuracy: 1.0 for the right code, chance (0.25) for the other
    assert dis.sap(codes, f)["sap"] == pytest.approx(0.75, abs=0.05)
    with pytest.raises(ValueError):
        dis.dci(codes, f, discrete=[True])


def test_dci_from_importance_hand_computed():
    assert dis.dci_from_importance(np.eye(3)) == pytest.approx((1.0, 1.0))
    assert dis.dci_from_importance(np.ones((3, 3))) == pytest.approx((0.0, 0.0))
    # factor 0 split evenly over codes 0 and 1: completeness (1 - log 2 / log 3 + 1) / 2
    d, c = dis.dci_from_importance(np.array([[0.5, 0.0], [0.5, 0.0], [0.0, 1.0]]))
    assert d == pytest.approx(1.0)
    assert c == pytest.approx((1 - math.log(2) / math.log(3) + 1) / 2)


def test_random_forest_option_and_shape_errors(data):
    d = dis.dci(data["identity"][:300], data["f"][:300], model="random_forest", n_estimators=10)
    assert set(d) == {"disentanglement", "completeness", "informativeness"}
    assert d["disentanglement"] > 0.7
    with pytest.raises(ValueError):
        dis.mig(data["identity"][:10], data["f"])
    with pytest.raises(ValueError):
        dis.dci(data["identity"], data["f"], model="lasso")


# ------------------------------------------------------------------------------------------ text metrics

HYPS = ["a red square moves to the left", "the circle becomes larger", "colour changes from red to blue"]
REFS = [
    ["the red square moves left", "a square shifts to the left side"],
    ["the circle grows bigger", "the size of the circle increases", "a larger circle"],
    ["the hue changes from red to blue"],
]


def test_bleu_matches_sacrebleu():
    import sacrebleu

    hyps, refs = HYPS[:2], [REFS[0], REFS[1][:2]]  # two references per item
    streams = [[refs[0][0], refs[1][0]], [refs[0][1], refs[1][1]]]
    assert tm.bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)
    # variable counts: a missing reference behaves like repeating an existing one
    padded = [[REFS[0][0], REFS[1][0], REFS[2][0]], [REFS[0][1], REFS[1][1], REFS[2][0]], [REFS[0][0], REFS[1][2], REFS[2][0]]]
    assert tm.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, padded).score)
    assert tm.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score_multi(rs, h)["rougeL"].fmeasure for h, rs in zip(HYPS, REFS)])
    assert tm.rouge_l(HYPS, REFS) == pytest.approx(expected)
    assert tm.rouge_l(["the cat sat on the mat"], [["the cat sat on the mat", "a dog"]]) == pytest.approx(1.0)


def test_cider_properties_and_hand_computed_values():
    refs = [["a b"], ["c d"]]
    # unigrams only: identical captions have cosine 1 -> 10
    assert tm.cider(["a b", "c d"], refs, n=1) == pytest.approx(10.0)
    # n = 4: orders 3 and 4 are empty for two-word captions -> (1 + 1 + 0 + 0) / 4 * 10
    assert tm.cider(["a b", "c d"], refs) == pytest.approx(5.0)
    # clipping: "a a" vs "a b" (idf = log 2 for both words): min(2L, L) * L / (2L * sqrt(2) L)
    assert tm.cider_item_scores(["a a", "c d"], refs, n=1)[0] == pytest.approx(10 / (2 * math.sqrt(2)))
    # no shared n-gram -> exactly 0
    assert tm.cider_item_scores(["x y z", "c d"], refs)[0] == 0.0
    # identical captions beat unrelated ones on a realistic corpus
    same = tm.cider([r[0] for r in REFS], REFS)
    unrelated = tm.cider(["a dog runs in the park", "an apple on a table", "stars at night"], REFS)
    assert same > tm.cider(HYPS, REFS) > unrelated >= 0.0
    # a single item with its own references as corpus: idf is 0 everywhere
    assert tm.cider(["a b"], [["a b"]]) == 0.0
    assert tm.cider(["a b"], [["a b"]], df_corpus=refs, n=1) == pytest.approx(10.0)


def test_input_validation():
    with pytest.raises(ValueError, match="no clear explanation"):
        tm.bleu(["ok", None], [["a"], ["b"]])
    with pytest.raises(ValueError):
        tm.rouge_l(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        tm.cider(["a"], [[]])
    with pytest.raises(TypeError):
        tm.bleu(["a"], ["a reference given as a bare string"])
    with pytest.raises(ValueError):
        tm.reference_metrics(["a"], [["  "]])
    with pytest.raises(ValueError):
        tm.reference_metrics([], [])


def _wordnet_present() -> bool:
    return tm._wordnet_unavailable_reason() is None


def test_optional_metrics_unavailable_here(tmp_path):
    out = tm.reference_metrics(HYPS, REFS)
    assert set(out) == {"bleu", "rouge_l", "cider", "meteor", "spice", "bertscore"}
    assert all(isinstance(out[k], float) for k in ("bleu", "rouge_l", "cider"))
    for name in ("spice", "bertscore"):
        assert isinstance(out[name], tm.MetricUnavailable)
        assert out[name].name == name and isinstance(out[name].reason, str) and out[name].reason
    if _wordnet_present():
        assert 0.0 <= out["meteor"] <= 1.0
    else:
        assert isinstance(out["meteor"], tm.MetricUnavailable) and out["meteor"].reason
    missing = tm.spice(HYPS, REFS, spice_jar=tmp_path / "nope.jar")
    assert isinstance(missing, tm.MetricUnavailable) and missing.reason
    assert isinstance(tm.bertscore(HYPS, REFS, model_dir=tmp_path / "no-model"), tm.MetricUnavailable)


def test_spice_output_parsing(tmp_path, monkeypatch):
    """The jar is faked: checks the input written and the parsing of the output format."""
    jar = tmp_path / "spice-1.0.jar"
    jar.write_text("")
    seen = {}

    def fake_run(cmd, **kwargs):
        src, dst = cmd[4], cmd[cmd.index("-out") + 1]
        with open(src) as fh:
            seen["items"] = json.load(fh)
        with open(dst, "w") as fh:
            json.dump([{"image_id": i, "scores": {"All": {"f": 0.2 * (i + 1)}}} for i in range(len(seen["items"]))], fh)

        class Done:
            returncode, stdout, stderr = 0, "", ""

        return Done()

    monkeypatch.setattr(tm.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(tm.subprocess, "run", fake_run)
    assert tm.spice(HYPS, REFS, spice_jar=jar) == pytest.approx(0.4)
    assert seen["items"][1] == {"image_id": 1, "test": HYPS[1], "refs": REFS[1]}
