"""The hf backend's caption-then-compare mode: caption comparison on hand-written captions, the
mechanics on a tiny random LLaVA, and the shipped demo VLM explaining the shipped demo VAE's
traversals, judged against the ground-truth factors."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from latentexplainer_plugin.backends.base import BackendError  # noqa: E402
from latentexplainer_plugin.backends.hf import CAPTION_WORDS, HFBackend, compare_captions, read_caption  # noqa: E402
from latentexplainer_plugin.errors import OptionError  # noqa: E402
from latentexplainer_plugin.types import ExampleSet, Prompt, Traversal  # noqa: E402
from latentexplainer_plugin.uncertainty.claims import ATTRIBUTE_FAMILIES, Claim, claim_agreement, parse_claims  # noqa: E402
from latentexplainer_plugin.vlm import ATTRIBUTES, WEIGHTS_DIR  # noqa: E402

try:
    from tests.tiny_vlms import save_tiny_vlm
except ImportError:  # tests/ on sys.path instead of the repository root
    from tiny_vlms import save_tiny_vlm  # type: ignore

BASE = {"size": "small", "colour": "red", "shape": "square", "vertical": "top", "horizontal": "left",
        "background": "dark"}


def cap(**change: str) -> str:
    w = BASE | change
    return f"a {w['size']} {w['colour']} {w['shape']} near the {w['vertical']} {w['horizontal']} on a {w['background']} background"


def labels(claims) -> list[str]:
    return sorted((Claim.from_json(c) if isinstance(c, dict) else c).label() for c in claims)


def test_caption_words_read_the_demo_vlm_captions_in_level_order():
    # every demo caption word is known, and ordered attributes keep the demo's level order
    for attribute, words in ATTRIBUTES.items():
        known = CAPTION_WORDS[attribute]
        assert set(words) <= set(known)
        assert sorted(words, key=known.index) == list(words), attribute
    assert read_caption(cap(horizontal="centre")) == BASE | {"horizontal": "centre"}
    assert read_caption("a big gray circle in the center")["horizontal"] == "centre"
    assert read_caption("a red and blue square")["colour"] is None  # two colours: not one word


def test_compare_captions_names_what_changed():
    text, claims, abstained = compare_captions([(cap(), cap(horizontal="right"))] * 2, "z9")
    assert text == "Increasing z9 moves the object right from the left to the right." and not abstained
    assert claims == [{"attribute": "horizontal_position", "direction": "+"}]
    text, claims, _ = compare_captions([(cap(), cap(colour="blue"))], "z4")
    assert text == "Increasing z4 changes the object's colour from red to blue."
    assert claims == [{"attribute": "colour", "start": "red", "end": "blue"}]
    # image up is +: top -> bottom is "-"; larger is +; dark -> grey background is brighter
    _, claims, _ = compare_captions([(cap(), cap(vertical="bottom", size="large", background="grey"))])
    assert labels(claims) == ["background_brightness +", "size +", "vertical_position -"]
    assert all(c["attribute"] in ATTRIBUTE_FAMILIES for c in claims)  # the certainty machinery's vocabulary


def test_compare_captions_needs_a_majority_of_rows_and_one_direction():
    # x changes in 2 of 3 rows, y in 1 of 3: only x is named
    pairs = [(cap(), cap(horizontal="right")), (cap(), cap(horizontal="centre", vertical="middle")), (cap(), cap())]
    text, claims, _ = compare_captions(pairs)
    assert claims == [{"attribute": "horizontal_position", "direction": "+"}]
    assert "from the left to the right" in text  # the most common (start, end): ties go to the first seen
    # rows disagree on the direction of size: not named; colour changes in both rows: named (most common pair)
    pairs = [(cap(size="small"), cap(size="large", colour="blue")),
             (cap(size="large"), cap(size="small", colour="blue"))]
    assert compare_captions(pairs)[1] == [{"attribute": "colour", "start": "red", "end": "blue"}]
    # half the rows is not a majority: caption noise, an abstention
    text, claims, abstained = compare_captions([(cap(), cap(shape="triangle")), (cap(), cap())])
    assert claims == [] and abstained and text.startswith("No consistent change")


def test_compare_captions_abstains_or_quotes_when_no_attribute_changes():
    text, claims, abstained = compare_captions([(cap(), cap())], "z0")
    assert abstained and claims == [] and text.startswith("No visible change")
    text, claims, abstained = compare_captions([("a cat on a mat", "a dog on a mat")], "z0")
    assert not abstained and claims == [] and '"a cat on a mat" to "a dog on a mat"' in text
    with pytest.raises(ValueError, match="at least one"):
        compare_captions([])


@pytest.mark.parametrize("attribute", ["size", "colour", "vertical", "horizontal", "background"])
def test_the_words_say_what_the_structured_claims_say(attribute):
    # the claim parser reading the text finds exactly the structured claims, for every change
    for start, end in itertools.permutations(ATTRIBUTES[attribute], 2):
        text, claims, _ = compare_captions([(cap(**{attribute: start}), cap(**{attribute: end}))], "z1")
        assert labels(parse_claims(text)) == labels(claims), text


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava-captions") / "model"
    return save_tiny_vlm("llava", path)


def _traversal(bases: int = 2, rows: int = 2, steps: int = 5) -> Traversal:
    g = torch.Generator().manual_seed(3)
    return Traversal(latent_id="z2", images=torch.rand(bases, rows, steps, 3, 16, 16, generator=g),
                     strengths=torch.linspace(-3, 3, steps), rule="set", index=2)


def test_caption_mode_mechanics_on_a_tiny_random_llava(tiny_dir):
    backend = HFBackend(str(tiny_dir), mode="caption_compare", min_new_tokens=3, max_new_tokens=5)
    assert backend.samples_from_bases and not HFBackend.samples_from_bases
    assert backend.sampling_params()["mode"] == "caption_compare"
    calls = []
    original = backend.model.generate

    def counted(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    backend.model.generate = counted
    torch.manual_seed(0)
    out = backend.explain(_traversal(bases=2, rows=2), Prompt(text="ignored", images=[], bias="x"), 3)
    assert len(out) == 3 and [r.meta["base"] for r in out] == [0, 1, 0]
    assert [r.meta["sampled_captions"] for r in out] == [False, False, True]
    # one greedy batch (2 bases x 2 rows x 2 frames) and one sampled batch (1 base x 2 rows x 2 frames)
    assert [(kw["do_sample"], kw["input_ids"].shape[0]) for kw in calls] == [(False, 8), (True, 4)]
    usage = out[0].meta["usage"]
    assert usage["requests"] == 2 and "usage" not in out[1].meta
    # every chat is the same prompt; every caption has 3..5 new tokens (min/max_new_tokens)
    per_prompt = calls[0]["attention_mask"][0].sum().item()
    assert usage["prompt_tokens"] == 12 * per_prompt and 12 * 3 <= usage["completion_tokens"] <= 12 * 5
    for r in out:
        assert r.ok and len(r.meta["captions"]) == 2 and all(len(p) == 2 and all(p) for p in r.meta["captions"])
        assert isinstance(r.meta["claims"], list)
    # greedy captions are reproducible
    again = backend.explain(_traversal(bases=2, rows=2), Prompt(text="ignored", images=[], bias="x"), 2)
    assert [r.meta["captions"] for r in again] == [r.meta["captions"] for r in out[:2]]
    assert backend.explain(_traversal(), Prompt(text="", images=[], bias="x"), 0) == []


def test_caption_mode_answers_come_back_from_the_response_cache(tiny_dir, tmp_path):
    from latentexplainer_plugin.biases import DISENTANGLEMENT, build_prompt
    from latentexplainer_plugin.components import get_backend

    def run():
        backend = get_backend(f"hf:{tiny_dir}", mode="caption_compare", max_new_tokens=4, cache_dir=str(tmp_path))
        assert backend.samples_from_bases  # the cache asks for all n answers or none
        traversal = _traversal()
        return backend, backend.explain(traversal, build_prompt(DISENTANGLEMENT, traversal), 2)

    first_backend, first = run()
    second_backend, second = run()
    assert first_backend.backend.generate_calls == 1 and second_backend.backend.generate_calls == 0
    assert [(r.text, r.meta["claims"], r.meta["captions"]) for r in second] == \
        [(r.text, r.meta["claims"], r.meta["captions"]) for r in first]


def test_caption_mode_refuses_what_it_cannot_do(tiny_dir):
    with pytest.raises(OptionError, match="mode"):
        HFBackend(str(tiny_dir), mode="captions")
    backend = HFBackend(str(tiny_dir), mode="caption_compare", max_new_tokens=3)
    with pytest.raises(BackendError, match="2 steps"):
        backend.explain(_traversal(steps=1), Prompt(text="", images=[], bias="x"), 1)
    examples = ExampleSet(latent_id="f0", activating=torch.rand(3, 3, 8, 8), activations=torch.ones(3),
                          inactive=torch.rand(3, 3, 8, 8))
    # example sets are explained by captioning them since the caption-contrast path exists (test_hf_caption_examples.py)
    answers = backend.explain_examples(examples, Prompt(text="", images=[], bias="x"), 1)
    assert len(answers) == 1 and answers[0].meta["n_firing"] == 3
    assert "mode" not in HFBackend(str(tiny_dir), max_new_tokens=3).sampling_params()  # default keys unchanged


CLAIM_FACTOR = {"horizontal_position": "x_position", "vertical_position": "y_position", "size": "scale",
                "colour": "hue", "background_brightness": "background"}


def test_demo_vlm_explains_the_demo_vae_by_captions():
    from latentexplainer_plugin import LatentExplainer
    from latentexplainer_plugin.attribution import most_active_other
    from latentexplainer_plugin.demo import demo_data, load_demo_model
    from latentexplainer_plugin.run import KL_ACTIVE, latent_stats

    model = load_demo_model()
    data = demo_data(300)
    stats = latent_stats(model, data["images"], data["factors"], list(data["factor_names"]))
    truth = {i: m.factor for i, m in enumerate(stats.factors) if stats.kl[i] > KL_ACTIVE}
    x_latent = next(i for i, f in truth.items() if f == "x_position")
    hue_latent = next(i for i, f in truth.items() if f == "hue")
    dead = next(i for i in range(len(stats.kl)) if stats.kl[i] < 0.1)
    backend = HFBackend(str(WEIGHTS_DIR), mode="caption_compare", max_new_tokens=16)
    explainer = LatentExplainer(model, backend=backend, samples=3, clamp=most_active_other(stats.kl))
    results = {r.index: r for r in explainer.attribute(target=[x_latent, hue_latent, dead])}
    for index, attribute in ((x_latent, "horizontal_position"), (hue_latent, "colour")):
        r = results[index]
        firsts = [a.meta["claims"][0]["attribute"] for a in r.responses if a.meta["claims"]]
        assert firsts.count(attribute) >= 2, (index, [a.text for a in r.responses])
        assert r.clear and r.explanation, r
    assert not results[dead].clear
    assert all(a.abstained for a in results[dead].responses)
    # the structured claims drive agreement: two x answers agree fully
    xs = [[Claim.from_json(c) for c in a.meta["claims"] if c["attribute"] == "horizontal_position"]
          for a in results[x_latent].responses]
    xs = [c for c in xs if c]
    assert len(xs) >= 2 and claim_agreement(xs[0], xs[1]) == pytest.approx(1.0)
