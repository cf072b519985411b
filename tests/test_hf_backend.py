"""HFBackend on a tiny random LLaVA built offline from configs, loaded through from_pretrained.

The model is random: its answers are gibberish, so the tests check structure and counts (n
answers from ONE generate call, text from the new tokens only, errors that say what to do).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from latentexplainer_plugin.backends.base import BackendError  # noqa: E402
from latentexplainer_plugin.backends.hf import HFBackend, resolve_dtype  # noqa: E402
from latentexplainer_plugin.biases import DISENTANGLEMENT, build_prompt  # noqa: E402
from latentexplainer_plugin.cache import CachedBackend  # noqa: E402
from latentexplainer_plugin.cli import main  # noqa: E402
from latentexplainer_plugin.components import get_backend  # noqa: E402
from latentexplainer_plugin.store import read_results  # noqa: E402
from latentexplainer_plugin.types import Prompt, Traversal  # noqa: E402

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "the", "object", "moves", "left",
         "right", "up", "down", "grows", "shrinks", "colour", "changes", "red", "blue", "image", "latent",
         "z0", "z1", "z2", "square", "circle", "rotates", "."]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}"
    "{{ c['text'] }} {% endif %}{% endfor %}"
    "{% elif message['role'] == 'system' %}{% for c in message['content'] %}{{ c['text'] }} {% endfor %}"
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }} {% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
MIN_NEW, MAX_NEW = 6, 8


def build_tiny_llava(path) -> None:
    """A random LLaVA (CLIP vision tower + Llama, hidden 32) and its processor, saved to ``path``."""
    try:
        from tests.tiny_llava import tiny_llava
    except ImportError:  # tests/ on sys.path instead of the repository root
        from tiny_llava import tiny_llava  # type: ignore

    model, processor = tiny_llava(WORDS, CHAT_TEMPLATE, hidden=32)
    # generation defaults saved with the model: random weights stop at random, so ask for a few tokens
    model.generation_config.min_new_tokens = MIN_NEW
    model.generation_config.max_new_tokens = MAX_NEW
    model.save_pretrained(path)
    processor.save_pretrained(path)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llava") / "model"
    build_tiny_llava(path)
    return path


@pytest.fixture(scope="module")
def backend(vlm_dir):
    return HFBackend(str(vlm_dir), min_new_tokens=MIN_NEW, max_new_tokens=MAX_NEW)


def make_traversal(latent: str = "z0") -> Traversal:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 2, 5, 3, 16, 16, generator=g)
    return Traversal(latent_id=latent, images=images, strengths=torch.linspace(-3, 3, 5), rule="set", index=0,
                     row_labels=["z1=-2", "z1=+2"], meta={"clamped": 1})


class CountGenerate:
    """Wraps ``model.generate`` of one instance and counts the real calls."""

    def __init__(self, model, monkeypatch):
        self.calls, self.kwargs = 0, []
        original = model.generate

        def counted(*args, **kwargs):
            self.calls += 1
            self.kwargs.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "generate", counted)


def test_n_answers_from_one_generate_call(backend, monkeypatch):
    counter = CountGenerate(backend.model, monkeypatch)
    traversal = make_traversal()
    prompt = build_prompt(DISENTANGLEMENT, traversal)
    before = backend.generate_calls
    out = backend.explain(traversal, prompt, 3)

    assert counter.calls == 1 and backend.generate_calls == before + 1
    kw = counter.kwargs[0]
    assert kw["do_sample"] is True and kw["num_return_sequences"] == 3
    assert kw["min_new_tokens"] == MIN_NEW and kw["max_new_tokens"] == MAX_NEW
    assert kw["input_ids"].shape[0] == 1  # the prompt is encoded once
    assert "pixel_values" in kw and kw["pixel_values"].dtype == torch.float32
    assert len(out) == 3
    for i, r in enumerate(out):
        assert r.ok and r.text.strip(), r
        assert r.meta["sample"] == i and r.meta["model"] == backend.path_or_id
        assert MIN_NEW <= r.meta["new_tokens"] <= MAX_NEW
        # only new tokens are decoded: the prompt's words ("changes", "latent", ...) would be there too
        assert len(r.text.split()) <= MAX_NEW
    assert backend.explain(traversal, prompt, 0) == []


def test_loads_through_from_pretrained_and_describes(backend, vlm_dir):
    assert type(backend.model).__name__ == "LlavaForConditionalGeneration"
    assert type(backend.processor).__name__ == "LlavaProcessor"
    d = backend.describe()
    assert d["name"] == "hf" and d["model"] == str(vlm_dir) and d["dtype"] == "float32" and d["device"] == "cpu"
    assert json.dumps(d)  # results.json can hold it
    assert backend.sampling_params()["revision"]  # a local directory's fingerprint is part of the cache key


def test_images_are_capped_and_system_text_kept(backend):
    big = Image.new("RGB", (1000, 300), "red")
    prompt = Prompt(text="the object moves", images=[big, Image.new("L", (40, 40))], bias="x", system="be brief")
    messages = backend.messages(prompt)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert max(parts[0]["image"].size) == 448 and parts[0]["image"].size[1] == round(300 * 448 / 1000)
    assert parts[1]["image"].size == (40, 40) and parts[1]["image"].mode == "RGB"
    out = backend.explain(make_traversal(), prompt, 2)
    assert len(out) == 2


def test_cached_factory_backend_skips_generate_on_rerun(vlm_dir, tmp_path):
    cached = get_backend(f"hf:{vlm_dir}", cache_dir=tmp_path / "cache", min_new_tokens=MIN_NEW, max_new_tokens=MAX_NEW)
    assert isinstance(cached, CachedBackend) and cached.name == "hf"
    traversal = make_traversal("z1")
    prompt = build_prompt(DISENTANGLEMENT, traversal)
    first = cached.explain(traversal, prompt, 3)
    assert cached.backend.generate_calls == 1
    again = cached.explain(traversal, prompt, 3)
    assert cached.backend.generate_calls == 1  # all 3 samples from the cache
    assert [r.text for r in again] == [r.text for r in first] and all(r.meta.get("cached") for r in again)


def test_directory_without_processor(vlm_dir, tmp_path):
    bare = tmp_path / "model-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(vlm_dir / name, bare / name)
    with pytest.raises(BackendError) as info:
        HFBackend(str(bare))
    message = str(info.value)
    assert "has no processor (preprocessor_config.json / tokenizer)" in message
    assert "a VLM directory needs both the model and its processor" in message


def test_bad_dtype_device_and_paths(vlm_dir, tmp_path):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float16, bfloat16.*'float64'"):
        HFBackend(str(vlm_dir), dtype="float64")
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        resolve_dtype(torch.int8)
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(None, "cpu") is torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            HFBackend(str(vlm_dir), device="cuda")
    with pytest.raises(BackendError, match="no such model directory"):
        HFBackend(str(tmp_path / "missing" / "model"))
    with pytest.raises(BackendError, match="has no config.json"):
        HFBackend(str(tmp_path))
    with pytest.raises(BackendError, match="from the hub or its local cache"):  # HF_HUB_OFFLINE=1 in conftest
        HFBackend("no-such-org/no-such-vlm")
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFBackend(str(vlm_dir), max_new_tokens=0)


# -- end to end through the command line ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae(tiny_trained_vae):
    return tiny_trained_vae / "model"


def test_cli_explain_with_hf_backend(vlm_dir, tiny_vae, tmp_path, monkeypatch, capsys):
    from transformers import LlavaForConditionalGeneration

    calls = []
    original = LlavaForConditionalGeneration.generate

    def counted(self, *args, **kwargs):
        calls.append(kwargs["num_return_sequences"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", counted)
    out = tmp_path / "run"
    code = main(["explain", "--model", str(tiny_vae), "--backend", f"hf:{vlm_dir}", "--samples", "3",
                 "--similarity", "bow", "--latents", "0,1", "--max-new-tokens", str(MAX_NEW),
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert calls == [3, 3]  # one generate call per latent, n=3 each
    data = read_results(out / "results.json")
    assert data["status"] == "complete" and data["backend"]["name"] == "hf" and data["backend"]["model"] == str(vlm_dir)
    assert [e["id"] for e in data["latents"]] == ["z0", "z1"]
    for e in data["latents"]:
        assert e["status"] == "ok" and 0.0 <= e["certainty"] <= 1.0
        assert len(e["responses"]) == 3
        assert all(r["text"] and r["error"] is None for r in e["responses"])  # text generated by the model
        assert (out / e["strip"]).is_file()
    assert "response cache: 0 samples reused, 6 asked" in captured.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "hf:"], "--backend hf:PATH_OR_ID needs a model directory or hub id"),
        (["--dtype", "int8"], "--dtype must be one of float32, float16, bfloat16"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--base-url", "http://127.0.0.1:9/v1"], "--base-url: not used by the hf backend"),
    ],
)
def test_cli_bad_hf_input(vlm_dir, tiny_vae, tmp_path, capsys, args, message):
    full = ["explain", "--model", str(tiny_vae), "--out", str(tmp_path / "never"), "--quiet", "--backend", f"hf:{vlm_dir}", *args]
    assert main(full) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never" / "results.json").exists()


def test_cli_dir_without_processor_fails_before_loading(vlm_dir, tiny_vae, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(vlm_dir / "config.json", bare / "config.json")
    code = main(["explain", "--model", str(tiny_vae), "--backend", f"hf:{bare}", "--out", str(tmp_path / "never"), "--quiet"])
    assert code == 2
    assert "has no processor (preprocessor_config.json / tokenizer)" in capsys.readouterr().err


def test_prompt_from_llm_with_a_local_vlm_falls_back_on_gibberish(backend):
    from latentexplainer_plugin.biases.from_llm import PromptFromLLMWarning, prompt_from_llm

    before = backend.generate_calls
    with pytest.warns(PromptFromLLMWarning, match=r"required placeholder\(s\) \{latent\} are missing|no answer"):
        bias = prompt_from_llm(DISENTANGLEMENT, backend)  # a text-only chat: no image in the prompt
    assert backend.generate_calls == before + 1
    assert bias.template == DISENTANGLEMENT.template and bias.extra["template_source"] == "deterministic"


def test_system_text_moves_into_the_user_turn_when_the_template_refuses_it(backend, monkeypatch):
    original = backend.processor.apply_chat_template
    seen = []

    def strict(messages, **kwargs):
        seen.append([m["role"] for m in messages])
        if any(m["role"] == "system" for m in messages):
            raise ValueError("System role not supported")
        return original(messages, **kwargs)

    monkeypatch.setattr(backend.processor, "apply_chat_template", strict)
    prompt = Prompt(text="the object moves", images=[Image.new("RGB", (32, 32))], bias="x", system="be brief")
    assert len(backend.explain(make_traversal(), prompt, 2)) == 2
    assert seen == [["system", "user"], ["user"]]
    assert backend.messages(prompt, system_role=False)[0]["content"][-1]["text"] == "be brief\n\nthe object moves"


def test_finish_reasons_and_token_counts(backend, monkeypatch):
    """An answer that ended with eos is "stop", one cut at max_new_tokens is "length"; the prompt's
    tokens are counted once for the one generate call."""
    moves, left = WORDS.index("moves"), WORDS.index("left")
    seen = {}

    def fake_generate(**kwargs):
        prompt = kwargs["input_ids"]
        seen["prompt_len"] = prompt.shape[1]
        stopped = [moves, left, 3] + [0] * (MAX_NEW - 3)  # eos (3) after 2 words, then padding
        cut = [moves, left] * (MAX_NEW // 2)  # no eos: ran into max_new_tokens
        new = torch.tensor([stopped, cut])
        return torch.cat([prompt.repeat(2, 1), new], dim=1)

    monkeypatch.setattr(backend.model, "generate", fake_generate)
    traversal = make_traversal()
    out = backend.explain(traversal, build_prompt(DISENTANGLEMENT, traversal), 2)
    assert [r.meta["finish_reason"] for r in out] == ["stop", "length"]
    assert [r.meta["new_tokens"] for r in out] == [3, MAX_NEW]
    assert out[0].meta["usage"] == {"prompt_tokens": seen["prompt_len"], "completion_tokens": 3 + MAX_NEW, "requests": 1}
    assert "usage" not in out[1].meta
