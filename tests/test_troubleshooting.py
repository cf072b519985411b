"""docs/troubleshooting.md quotes messages exactly: each case here makes the code produce one and
checks that the page holds it verbatim (the rows of tests/test_bad_inputs.py are checked there)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from latentexplainer_plugin.cli import main

DOC = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()

GENERATORS = '''
import torch
from torch import nn


class Gen(nn.Module):
    latent_dim = 4

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 16, 16)


class NoSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3 * 16 * 16))

    def forward(self, z):
        return torch.tanh(z.sum(1, keepdim=True) * self.w).view(-1, 3, 16, 16)


class NoLayer(nn.Module):
    latent_dim = 4

    def forward(self, z):
        return torch.tanh(z[:, :3, None, None].expand(-1, 3, 16, 16))


def make():
    return Gen()


def nosize():
    return NoSize()


def nolayer():
    return NoLayer()


def notmodule():
    return 42
'''


@pytest.fixture
def code_dir(tmp_path, monkeypatch):
    """A folder (the current directory) with generator factories, a broken module and a directions file."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "gens.py").write_text(GENERATORS)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    save_file({"directions": torch.ones(2, 7)}, str(tmp_path / "dirs.safetensors"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli_error(capsys, *argv: str) -> str:
    assert main(["explain", "--out", "o", "--samples", "2", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and not Path("o", "results.json").exists()
    return err


@pytest.mark.parametrize("argv", [
    ["--adapter", "generator", "--model", "nofactory"],
    ["--model", "missing.py:make"],
    ["--model", "gens.py:nothere"],
    ["--model", "broken.py:make"],
    ["--model", "gens.py:notmodule"],
    ["--model", "gens.py:nosize"],
    ["--model", "gens.py:nosize", "--latent-dim", "0"],
    ["--model", "gens.py:nolayer", "--direction", "sefa"],
    ["--model", "gens.py:make", "--direction", "dirs.safetensors"],
], ids=["not-a-factory", "no-file", "no-callable", "import-failed", "not-a-module", "latent-size", "latent-dim-0",
        "sefa-no-layer", "directions-wrong-size"])
def test_generator_errors_are_quoted_exactly(code_dir, capsys, argv):
    err = cli_error(capsys, *argv)
    assert err in DOC, err


def test_latent_dim_and_direction_with_a_vae_are_quoted_exactly(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["--model", "vae", "--latent-dim", "4"], ["--model", "vae", "--direction", "sefa"]):
        err = cli_error(capsys, *argv)
        assert err in DOC, err


@pytest.mark.parametrize("call", [
    lambda d: d.dci(np.zeros((30, 3)), np.zeros((30, 2)), train_fraction=1.5),
    lambda d: d.dci(np.zeros((2, 3)), np.zeros((2, 2))),
    lambda d: d.mig(np.zeros((30, 3)), np.zeros((30, 2)), discrete=[True]),
    lambda d: d.dci(np.random.default_rng(0).normal(size=(30, 3)), np.zeros((30, 2))),
], ids=["train-fraction", "too-few", "discrete-length", "constant-factors"])
def test_disentanglement_errors_are_quoted_exactly(call):
    from latentexplainer_plugin.evaluation import disentanglement

    with pytest.raises(ValueError) as info:
        call(disentanglement)
    assert f"ValueError: {info.value}" in DOC, str(info.value)


def test_judge_errors_and_the_unjudgeable_reason_are_quoted_exactly():
    from latentexplainer_plugin.evaluation.judge import FactorJudge

    def embed(texts):
        return np.ones((len(texts), 2))

    for kwargs in ({"factor_names": ["scale"], "descriptions": {"size": ["bigger"]}},
                   {"factor_names": ["scale"], "level_names": {"colour": ["red"]}},
                   {"factor_names": ["scale", "scale"]},
                   {"factor_names": ["scale"], "descriptions": {"scale": []}}):
        with pytest.raises(ValueError) as info:
            FactorJudge(embed=embed, **kwargs)
        assert f"ValueError: {info.value}" in DOC, str(info.value)
    reason = FactorJudge(["label"], embed=embed).unjudgeable["label"]
    assert f"not counted in factor_accuracy): {reason}\n" in DOC


def test_timeout_and_api_key_env_messages_are_quoted_exactly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    monkeypatch.chdir(tmp_path)
    for flags in (["--timeout", "inf"], ["--timeout", "nan"], ["--timeout", "0"], ["--api-key-env", "sk-abc-123"]):
        err = cli_error(capsys, "--model", "vae", "--backend", "openai:m", "--base-url", "http://127.0.0.1:9/v1", *flags)
        assert err in DOC, err
        assert "sk-abc-123" not in err


def test_failed_sample_reasons_are_quoted_exactly(monkeypatch):
    from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend
    from latentexplainer_plugin.types import Prompt

    try:
        from tests.loopback_server import Fault, LoopbackServer
    except ImportError:
        from loopback_server import Fault, LoopbackServer  # type: ignore

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    reply = Fault.choices(("The square grows and", "length"), ("The square grows.", "content_filter"), ("x" * 5000, "stop"))
    with LoopbackServer(respond=lambda request: reply) as server:
        backend = OpenAICompatBackend("m", base_url=server.url, timeout=10, max_retries=0)
        out = backend.explain(None, Prompt(text="What changes?", images=[], bias="combination"), 3)
    assert [r.text for r in out] == [None, None, None]
    for response in out:
        assert f"\n{response.error}\n" in DOC, response.error


def test_samples_1_and_cache_write_warnings_are_quoted(tiny_vae, tmp_path, monkeypatch):
    import errno

    from latentexplainer_plugin.attribution import LatentExplainer
    from latentexplainer_plugin.cache import CacheWriteWarning, ResponseCache
    from latentexplainer_plugin.types import Response

    with pytest.warns(UserWarning) as caught:
        LatentExplainer(tiny_vae, samples=1)
    assert f"UserWarning: {caught[0].message}\n" in DOC

    def in_the_way(self, path, text):
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(ResponseCache, "_write", in_the_way)
    cache = ResponseCache(tmp_path / "CACHE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.put("b3" + "0" * 62, Response(text="The square grows.")) is False
    message = str(next(w.message for w in caught if issubclass(w.category, CacheWriteWarning)))
    head, tail = message.split(" (File exists: ")[0], message.split(".json)")[1]
    shown = f"CacheWriteWarning: {head} (File exists: CACHE/b3/"
    assert shown in DOC and tail.replace(str(tmp_path / "CACHE"), "CACHE") in DOC
