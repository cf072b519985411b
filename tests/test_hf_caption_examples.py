"""The hf backend's caption_compare mode on feature example sets: the demo VLM captions the firing and
non-firing images and names the caption word over-represented where the feature fires, in the claim
vocabulary of the offline contrastive explainer (an LMM explaining an LMM's features)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from latentexplainer_plugin.backends.hf import HFBackend, contrast_captions  # noqa: E402
from latentexplainer_plugin.backends.offline import OfflineBackend  # noqa: E402
from latentexplainer_plugin.data.shapes import FACTOR_NAMES, render, sample_factors  # noqa: E402
from latentexplainer_plugin.errors import OptionError  # noqa: E402
from latentexplainer_plugin.types import ExampleSet, Prompt  # noqa: E402
from latentexplainer_plugin.uncertainty import select_explanation  # noqa: E402
from latentexplainer_plugin.vlm import WEIGHTS_DIR  # noqa: E402

PROMPT = Prompt(text="", images=[], bias="x")
HUE, X = FACTOR_NAMES.index("hue"), FACTOR_NAMES.index("x_position")


def cap(colour="red", vertical="top", horizontal="left", size="small", shape="square", background="dark") -> str:
    return f"a {size} {colour} {shape} near the {vertical} {horizontal} on a {background} background"


def test_contrast_captions_names_the_over_represented_word():
    others = [cap(colour=c, horizontal=h) for c in ("red", "blue", "yellow") for h in ("left", "centre", "right")]
    firing = [cap(colour="green", horizontal=h) for h in ("left", "right", "centre")]
    text, claims, abstained, detail = contrast_captions(firing, others, "f7")
    assert (text, claims, abstained) == ("f7 fires on green objects.", [{"attribute": "colour", "end": "green"}], False)
    # green: 3/3 firing, 0/9 not firing; "left": 1/3 - 3/9 = 0
    assert detail["shares"]["colour:green"] == pytest.approx(1.0) and detail["shares"]["horizontal:left"] == 0.0
    assert detail["named"] == ["green"]


@pytest.mark.parametrize("word, field, claim", [
    ("top", "vertical", {"attribute": "vertical_position", "direction": "+"}),  # image up is +, as offline
    ("bottom", "vertical", {"attribute": "vertical_position", "direction": "-"}),
    ("left", "horizontal", {"attribute": "horizontal_position", "direction": "-"}),
    ("large", "size", {"attribute": "size", "direction": "+"}),
    ("grey", "background", {"attribute": "background_brightness", "direction": "+"}),
    ("medium", "size", {"attribute": "size"}),  # a middle level has no direction
])
def test_contrast_claims_use_the_offline_vocabulary(word, field, claim):
    levels = {"vertical": ("top", "middle", "bottom"), "size": ("small", "medium", "large"),
              "horizontal": ("left", "centre", "right"), "background": ("dark", "grey")}[field]
    others = [cap(**{field: w}) for w in levels if w != word] * 3
    _, claims, abstained, _ = contrast_captions([cap(**{field: word})] * 3, others)
    assert not abstained and claims == [claim]


def test_contrast_captions_abstains_without_separation_or_examples():
    mixed = [cap(colour=c) for c in ("red", "blue", "green")]
    text, claims, abstained, detail = contrast_captions(mixed, mixed * 2, "f1")
    assert abstained and claims == [] and detail["reason"] == "no separation" and text.startswith("No visible difference")
    _, _, abstained, detail = contrast_captions(mixed[:2], mixed, "f1")
    assert abstained and detail["reason"] == "too few examples"
    # 2 of 3 firing captions green against 1 of 6: 2/3 - 1/6 = 0.5 reaches the default 0.5, not 0.6
    firing = [cap(colour="green"), cap(colour="green"), cap(colour="red")]
    others = [cap(colour="blue")] * 5 + [cap(colour="green")]
    assert contrast_captions(firing, others)[1] == [{"attribute": "colour", "end": "green"}]
    assert contrast_captions(firing, others, min_share_difference=0.6)[2]
    # a second attribute is named only when it separates at least halfway from the threshold to 1
    firing = [cap(colour="green", size="large")] * 3
    text, claims, _, _ = contrast_captions(firing, [cap(colour="blue", size="small")] * 6, "f2")
    assert text == "f2 fires on large objects and on green objects."  # a tie: CAPTION_WORDS order (size first)
    assert claims == [{"attribute": "size", "direction": "+"}, {"attribute": "colour", "end": "green"}]
    # a second attribute at 2/3 < (1 + 0.5) / 2 is left out
    firing = [cap(colour="green", size="large")] * 2 + [cap(colour="green", size="small")]
    assert contrast_captions(firing, [cap(colour="blue", size="small")] * 6)[1] == [{"attribute": "colour", "end": "green"}]


def _images(factors: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(render(factors)).permute(0, 3, 1, 2).float() / 255.0


def _example_set(firing: np.ndarray, other: np.ndarray, name: str = "f7") -> ExampleSet:
    return ExampleSet(latent_id=name, activating=_images(firing), activations=torch.linspace(2.0, 1.0, len(firing)),
                      inactive=_images(other))


def _green_split(n: int = 15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    firing, other = sample_factors(n, seed=11), sample_factors(n, seed=12)
    firing[:, HUE] = 1 / 3 + rng.uniform(-0.02, 0.02, n)  # green
    other[:, HUE] = rng.choice([0.0, 1 / 12, 1 / 6, 2 / 3], n)  # red, orange, yellow, blue
    return firing, other


@pytest.fixture(scope="module")
def demo_vlm():
    return HFBackend(str(WEIGHTS_DIR), mode="caption_compare", max_new_tokens=16)


def test_demo_vlm_says_a_green_feature_fires_on_green_objects_as_offline_does(demo_vlm):
    examples = _example_set(*_green_split())
    calls = demo_vlm.generate_calls
    answers = demo_vlm.explain_examples(examples, PROMPT, 5)
    assert demo_vlm.generate_calls == calls + 1  # 30 images captioned in one batch
    assert len(answers) == 5 and [a.meta["subset"] for a in answers] == list(range(5))
    assert all(a.meta["n_firing"] == 3 and a.meta["n_not_firing"] == 15 for a in answers)
    named = [a.meta["claims"] for a in answers if not a.abstained]
    assert len(named) >= 4, [a.text for a in answers]
    assert all(c[0] == {"attribute": "colour", "end": "green"} for c in named), named
    chosen = select_explanation(answers)
    assert chosen.clear and chosen.explanation.startswith("f7 fires on green objects")
    # the offline contrastive explainer measures the same images and makes the same claim
    offline = OfflineBackend().explain_examples(examples, PROMPT, 5)
    assert {str(a.meta["claims"][:1]) for a in offline if not a.abstained} == {str([named[0][0]])}
    assert answers[0].meta["usage"]["requests"] == 1


def test_demo_vlm_left_feature_matches_offline_direction(demo_vlm):
    firing, other = sample_factors(15, seed=21), sample_factors(15, seed=22)
    firing[:, X] = np.linspace(0.26, 0.38, 15)  # the left third of x_range (0.25, 0.75)
    other[:, X] = np.linspace(0.48, 0.74, 15)
    examples = _example_set(firing, other, "f3")
    ours = select_explanation(demo_vlm.explain_examples(examples, PROMPT, 5))
    theirs = select_explanation(OfflineBackend().explain_examples(examples, PROMPT, 5))
    assert ours.clear and theirs.clear, (ours.explanation, theirs.explanation)
    claim = {"attribute": "horizontal_position", "direction": "-"}
    kept = next(r for r in ours.responses if r.text == ours.explanation)
    assert kept.meta["claims"] == [claim] and kept.text == "f3 fires when the object is on the left."
    assert claim in next(r for r in theirs.responses if r.text == theirs.explanation).meta["claims"]


def test_random_split_is_not_clear(demo_vlm):
    factors = sample_factors(30, seed=5)
    answers = demo_vlm.explain_examples(_example_set(factors[:15], factors[15:], "f9"), PROMPT, 5)
    assert not select_explanation(answers).clear, [a.text for a in answers]


def test_dead_features_and_bad_input(demo_vlm):
    dead = ExampleSet(latent_id="f0", activating=torch.zeros(0, 3, 64, 64), activations=torch.zeros(0),
                      inactive=_images(sample_factors(4, seed=1)))
    calls = demo_vlm.generate_calls
    answers = demo_vlm.explain_examples(dead, PROMPT, 3)
    assert demo_vlm.generate_calls == calls  # nothing captioned for a dead feature
    assert all(a.abstained and a.meta["reason"] == "dead" for a in answers) and len(answers) == 3
    few = _example_set(*_green_split(4))
    answers = demo_vlm.explain_examples(few, PROMPT, 2)  # 2 firing images per answer < min_examples 3
    assert all(a.abstained and a.meta["reason"] == "too few examples" for a in answers)
    with pytest.raises(ValueError, match="n must be >= 0"):
        demo_vlm.explain_examples(few, PROMPT, -1)
    with pytest.raises(OptionError, match="min_share_difference"):
        HFBackend(str(WEIGHTS_DIR), mode="caption_compare", min_share_difference=1.5)
    with pytest.raises(OptionError, match="min_examples"):
        HFBackend(str(WEIGHTS_DIR), mode="caption_compare", min_examples=1)


@pytest.mark.parametrize("arch", ["llava", "gemma3", "idefics3"])
def test_example_sets_by_captions_on_tiny_random_vlms(arch, tmp_path):
    try:
        from tests.tiny_vlms import save_tiny_vlm
    except ImportError:  # tests/ on sys.path instead of the repository root
        from tiny_vlms import save_tiny_vlm  # type: ignore
    from latentexplainer_plugin.uncertainty.claims import ATTRIBUTE_FAMILIES

    path = save_tiny_vlm(arch, tmp_path / arch)
    backend = HFBackend(str(path), mode="caption_compare", min_new_tokens=4, max_new_tokens=6)
    g = torch.Generator().manual_seed(0)
    examples = ExampleSet(latent_id="f1", activating=torch.rand(6, 3, 32, 32, generator=g),
                          activations=torch.arange(6, 0, -1).float(), inactive=torch.rand(4, 3, 32, 32, generator=g))
    answers = backend.explain_examples(examples, PROMPT, 2)
    assert backend.generate_calls == 1 and len(answers) == 2
    assert [a.meta["n_firing"] for a in answers] == [3, 3] and all(len(a.meta["captions"]) == 3 for a in answers)
    assert len(answers[0].meta["not_firing_captions"]) == 4 and answers[0].meta["usage"]["requests"] == 1
    for a in answers:  # random weights: whatever the captions say, the answer is well formed
        assert a.abstained == (a.meta["claims"] == [])
        assert all(c["attribute"] in ATTRIBUTE_FAMILIES for c in a.meta["claims"])
