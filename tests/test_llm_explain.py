"""Explanations from an OpenAI-compatible server, end to end through the CLI, against the loopback server.

The server's answer depends on the latent named in the prompt: z0 always gets the same sentence
(a clear explanation), z1 gets five unrelated sentences (no agreement), z2 a consistent answer
wrapped in chat boilerplate. A tiny VAE trained by ``train-vae`` stands in for a real model.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from latentexplainer_plugin.backends.offline import OfflineBackend
from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend
from latentexplainer_plugin.biases import CONDITIONAL, DISENTANGLEMENT, InductiveBias, build_prompt
from latentexplainer_plugin.biases.from_llm import (PromptFromLLMWarning, TemplateError, check_template, meta_prompt,
                                                    prompt_from_llm)
from latentexplainer_plugin.cli import main
from latentexplainer_plugin.hookspecs import hookimpl
from latentexplainer_plugin.plugins import register_plugin, registry, unregister_plugin
from latentexplainer_plugin.store import read_results
from latentexplainer_plugin.types import Response, Traversal
from latentexplainer_plugin.uncertainty import select_explanation

try:
    from tests.loopback_server import Fault, LoopbackServer, Reply
except ImportError:
    from loopback_server import Fault, LoopbackServer, Reply  # type: ignore

KEY = "sk-loopback-SECRET-5d41402abc4b2a76"
Z0 = "The object moves left to right."
VARIED = [
    "The background turns dark.",
    "A square rotates clockwise.",
    "Its colour shifts toward green.",
    "Shape becomes elongated quickly.",
    "Tiny dots flicker around edges.",
]
Z2_RAW = "Sure! Here is the explanation: **The square grows larger.** Let me know if you need more."
Z2 = "The square grows larger."
META_MARKER = "Write a prompt template"
LLM_TEMPLATE = "LLMTEMPLATE: the grid shows latent {latent} from {low} to {high}, where {formula_in_words}. Describe the change in one sentence."


def latent_of(request) -> str | None:
    text = " ".join(request.text_parts())
    match = re.search(r"\b(z\d+)\b", text)
    return match.group(1) if match else None


def answer(request, i: int) -> str:
    text = " ".join(request.text_parts())
    if META_MARKER in text:
        return "Here is the prompt template: " + LLM_TEMPLATE
    latent = latent_of(request)
    if latent == "z0":
        return Z0
    if latent == "z1":
        return VARIED[(i + request.ordinal) % len(VARIED)]
    return Z2_RAW


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    with LoopbackServer(answer=answer, require_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def tiny_vae(tiny_trained_vae):
    return tiny_trained_vae / "model"


def run(tiny_vae, server, out: Path, *extra: str) -> int:
    return main(["explain", "--model", str(tiny_vae), "--backend", "openai:test-model", "--base-url", server.url,
                 "--samples", "5", "--latents", "0,1,2", "--similarity", "bow", "--out", str(out), "--quiet",
                 "--timeout", "5", *extra])


def entries(out: Path) -> dict[str, dict]:
    return {e["id"]: e for e in read_results(out / "results.json")["latents"]}


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


# -- the happy path, key hygiene and the cache -------------------------------------------------------


def test_explanations_come_from_the_server_and_the_cache_saves_requests(tiny_vae, server, tmp_path, capsys):
    cache = tmp_path / "cache"
    out1 = tmp_path / "run1"
    assert run(tiny_vae, server, out1, "--cache-dir", str(cache)) == 0
    first = capsys.readouterr()
    chat = server.chat_requests
    assert len(chat) == 3 and all(r.n == 5 for r in chat)  # one request with n=5 per latent
    assert all(r.image_urls() and r.image_urls()[0].startswith("data:image/png;base64,") for r in chat)
    assert sorted(latent_of(r) for r in chat) == ["z0", "z1", "z2"]

    e = entries(out1)
    assert e["z0"]["status"] == "ok" and e["z0"]["clear"] is True
    assert e["z0"]["explanation"] == Z0 and e["z0"]["certainty"] == pytest.approx(1.0)
    assert [r["text"] for r in e["z0"]["responses"]] == [Z0] * 5
    assert e["z1"]["status"] == "ok" and e["z1"]["clear"] is False and e["z1"]["explanation"] is None
    assert e["z1"]["certainty"] < 0.3 and sorted(r["text"] for r in e["z1"]["responses"]) == sorted(VARIED)
    assert e["z2"]["clear"] is True and e["z2"]["explanation"] == Z2  # boilerplate removed
    data = read_results(out1 / "results.json")
    assert data["backend"]["name"] == "openai" and data["backend"]["model"] == "test-model"
    assert data["backend"]["base_url"] == server.url and data["backend"]["api_key_env"] == "OPENAI_API_KEY"

    # the key is in no file of the run, no cache entry and no output
    for path, content in all_bytes(out1) + all_bytes(cache):
        assert KEY.encode() not in content, path
    assert KEY not in first.out and KEY not in first.err
    assert "response cache: 0 samples reused, 15 asked" in first.out

    # the same run again: every sample from the cache, no request at all
    out2 = tmp_path / "run2"
    assert run(tiny_vae, server, out2, "--cache-dir", str(cache)) == 0
    assert len(server.chat_requests) == 3
    assert "response cache: 15 samples reused, 0 asked" in capsys.readouterr().out
    again = entries(out2)
    for lid in ("z0", "z1", "z2"):
        assert again[lid]["responses"] == e[lid]["responses"] and again[lid]["certainty"] == e[lid]["certainty"]

    # --no-cache asks again
    assert run(tiny_vae, server, tmp_path / "run3", "--cache-dir", str(cache), "--no-cache") == 0
    assert len(server.chat_requests) == 6
    assert "response cache" not in capsys.readouterr().out


def test_a_latent_whose_requests_all_fail_is_failed_the_others_ok(tiny_vae, server, tmp_path, capsys):
    server.respond = lambda request: Fault.status(500, message="model overloaded") if latent_of(request) == "z1" else None
    out = tmp_path / "run"
    code = run(tiny_vae, server, out, "--no-cache", "--max-retries", "1")
    captured = capsys.readouterr()
    assert code == 1
    e = entries(out)
    assert e["z1"]["status"] == "failed" and e["z1"]["explanation"] is None
    assert "HTTP 500" in e["z1"]["error"] and "model overloaded" in e["z1"]["error"]
    assert all(r["text"] is None and "HTTP 500" in r["error"] for r in e["z1"]["responses"])
    assert e["z0"]["status"] == "ok" and e["z0"]["explanation"] == Z0
    assert e["z2"]["status"] == "ok" and e["z2"]["explanation"] == Z2
    assert "z1: FAILED" in captured.out and "1 of 3 latents failed" in captured.out
    z1_requests = [r for r in server.chat_requests if latent_of(r) == "z1"]
    assert len(z1_requests) == 2  # the first attempt and one retry
    assert KEY not in captured.out + captured.err


def test_flaky_server_every_latent_ok_or_failed_never_scored_from_errors(tiny_vae, tmp_path, capsys):
    def chaos(request):  # about 15 % 429 (with Retry-After) and 15 % 500, fixed per arrival number
        draw = random.Random(f"chaos:{request.ordinal}").random()
        if draw < 0.15:
            return Fault.status(429, retry_after=0.01, message="rate limited")
        if draw < 0.30:
            return Fault.status(500, message="flaky")
        return None

    # slow_rate applies to the remaining 70 %: 0.143 * 0.7 = 10 % of requests answer after the timeout
    with LoopbackServer(answer=answer, require_key=KEY, respond=chaos, supports_n=False, slow_rate=0.143,
                        slow_delay=0.8, seed=3) as server:
        out = tmp_path / "run"
        code = main(["explain", "--model", str(tiny_vae), "--backend", "openai:test-model", "--base-url", server.url,
                     "--samples", "5", "--latents", "0,1,2", "--similarity", "bow", "--out", str(out), "--quiet",
                     "--no-cache", "--timeout", "0.5", "--max-retries", "2", "--concurrency", "4"])
        requests = list(server.chat_requests)
    captured = capsys.readouterr()
    assert code in (0, 1)
    faults = [r for r in requests if random.Random(f"chaos:{r.ordinal}").random() < 0.30]
    assert faults  # the schedule did inject errors (which requests got them depends on thread timing)
    e = entries(out)
    assert sorted(e) == ["z0", "z1", "z2"]  # none missing
    assert code == (1 if any(x["status"] == "failed" for x in e.values()) else 0)
    for lid, entry in e.items():
        assert entry["status"] in ("ok", "failed")
        assert len(entry["responses"]) == 5
        for r in entry["responses"]:
            assert (r["text"] is None) == (r["error"] is not None)  # a sample is an answer or an error, never both
        if entry["status"] == "failed":
            assert entry["error"] and all(r["error"] for r in entry["responses"])
            continue
        ok = [r for r in entry["responses"] if r["error"] is None]
        assert ok
        # the certainty is the one the answers alone give: errors were excluded, not scored
        redo = select_explanation([Response(text=r["text"], error=r["error"], abstained=r["abstained"])
                                   for r in entry["responses"]], "bow")
        assert entry["certainty"] == pytest.approx(redo.certainty)
        assert redo.failures == 5 - len(ok)
        if entry["clear"]:
            assert entry["explanation"] in {r["text"] for r in ok}
    assert e["z1"]["clear"] is False
    if e["z0"]["status"] == "ok":
        assert e["z0"]["explanation"] == Z0
    assert KEY not in captured.out + captured.err


# -- bad input fails before any request -----------------------------------------------------------------


def test_missing_key_exits_2_before_any_request(tiny_vae, server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    assert run(tiny_vae, server, tmp_path / "a", "--no-cache") == 2
    assert "No API key: set the OPENAI_API_KEY environment variable" in capsys.readouterr().err
    assert run(tiny_vae, server, tmp_path / "b", "--no-cache", "--api-key-env", "MY_TEAM_KEY") == 2
    assert "set the MY_TEAM_KEY environment variable" in capsys.readouterr().err
    assert server.requests == []
    assert not (tmp_path / "a" / "results.json").exists()
    monkeypatch.setenv("MY_TEAM_KEY", KEY)  # the other variable is used when named
    assert run(tiny_vae, server, tmp_path / "c", "--cache-dir", str(tmp_path / "cache"), "--api-key-env", "MY_TEAM_KEY") == 0
    assert server.chat_requests[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "openai:"], "--backend openai:MODEL needs a model name, e.g. openai:gpt-4o"),
        (["--backend", "openai"], "--backend openai:MODEL needs a model name"),
        (["--concurrency", "0"], "--concurrency must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be a finite number of seconds > 0, got 0.0"),
        (["--timeout", "-1"], "--timeout must be a finite number of seconds > 0"),
        (["--max-retries", "-1"], "--max-retries must be >= 0, got -1"),
        (["--base-url", "ftp://127.0.0.1/v1"], "--base-url must be an http:// or https:// URL, got 'ftp://127.0.0.1/v1'"),
        (["--base-url", "localhost:11434/v1"], "--base-url must be an http:// or https:// URL"),
        (["--dtype", "bfloat16"], "--dtype: not used by the openai backend"),
        (["--bias", "conditional"], "the 'conditional' bias needs --property TEXT"),
    ],
)
def test_bad_openai_input(tiny_vae, server, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    base = ["explain", "--model", str(tiny_vae), "--backend", "openai:test-model", "--base-url", server.url,
            "--out", str(out), "--quiet", "--no-cache"]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err
    assert server.requests == [] and not (out / "results.json").exists()


def test_llm_flags_with_the_offline_backend_are_refused(tiny_vae, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["explain", "--model", str(tiny_vae), "--out", str(out), "--quiet", "--base-url", "http://127.0.0.1:1/v1"]) == 2
    assert "--base-url: not used by the offline backend" in capsys.readouterr().err
    assert main(["explain", "--model", str(tiny_vae), "--out", str(out), "--quiet", "--prompt-from-llm"]) == 2
    assert "--prompt-from-llm needs a language-model backend" in capsys.readouterr().err


# -- a bias from a plugin -------------------------------------------------------------------------------

MOTION = InductiveBias(
    name="motion-only",
    formula="x_t = g(z + t e_i)",
    symbols={"x_t": "the picture at step t", "g": "the decoder", "z": "a random code", "e_i": "the axis of {latent}"},
    template="MOTIONBIAS: as latent {latent} goes from {low} to {high}, {formula_in_words}. Say how the object moves.",
    rows=1,
)


class MotionBiasPlugin:
    @hookimpl
    def latentexplainer_register_biases(self, register):
        register("motion-only", lambda: MOTION)


def test_a_plugin_bias_through_the_hook(tiny_vae, server, tmp_path):
    register_plugin(MotionBiasPlugin(), name="test-motion-bias", distribution="test-dist")
    try:
        entry = registry("biases").get("motion-only")
        assert entry.plugin == "test-motion-bias" and entry.distribution == "test-dist"
        out = tmp_path / "run"
        assert run(tiny_vae, server, out, "--no-cache", "--bias", "motion-only") == 0
    finally:
        unregister_plugin("test-motion-bias")
    texts = [" ".join(r.text_parts()) for r in server.chat_requests]
    assert len(texts) == 3 and all(t.startswith("MOTIONBIAS: as latent z") for t in texts)
    assert any("the picture at step t = the decoder(a random code + t the axis of z0)" in t for t in texts)
    data = read_results(out / "results.json")
    assert data["bias"] == "motion-only" and entries(out)["z0"]["explanation"] == Z0
    with pytest.raises(ValueError, match="unknown bias 'motion-only'"):
        registry("biases").get("motion-only")


# -- prompt from an LLM -----------------------------------------------------------------------------------


def backend_for(server, **kw) -> OpenAICompatBackend:
    return OpenAICompatBackend(model="test-model", base_url=server.url, timeout=5, backoff_base=0.01, max_retries=1, **kw)


def test_prompt_from_llm_uses_a_checked_llm_template(server):
    with backend_for(server) as backend:
        bias = prompt_from_llm(DISENTANGLEMENT, backend)
    assert bias.template == LLM_TEMPLATE and bias.extra["template_source"] == "llm"
    assert (bias.name, bias.formula, bias.rows) == (DISENTANGLEMENT.name, DISENTANGLEMENT.formula, DISENTANGLEMENT.rows)
    (request,) = server.chat_requests
    text = " ".join(request.text_parts())
    assert request.n == 1 and request.image_urls() == []  # text only, one sample
    assert DISENTANGLEMENT.formula in text and "z_i -> the change produced by {latent}" in text
    assert "Prompt template: Each row of the image" in text  # the in-context example (the combination bias)
    assert "you must use {latent}" in text


def test_prompt_from_llm_falls_back_on_a_bad_template(server):
    bad = {
        "no latent": "Describe what changes between {low} and {high}.",
        "unknown": "Describe how {latent} changes the {colour}.",
        "braces": "Describe {latent} as JSON {\"a\": 1}.",
        "empty": "   ",
    }
    for reason, template in bad.items():
        server.answer = template
        with backend_for(server) as backend, pytest.warns(PromptFromLLMWarning, match="using the deterministic template"):
            bias = prompt_from_llm(DISENTANGLEMENT, backend)
        assert bias.template == DISENTANGLEMENT.template, reason
        assert bias.extra["template_source"] == "deterministic" and bias.extra["template_rejected"]
    server.answer = "x"
    server.respond = lambda request: Fault.status(500)
    with backend_for(server) as backend, pytest.warns(PromptFromLLMWarning, match="no answer.*HTTP 500"):
        assert prompt_from_llm(DISENTANGLEMENT, backend).template == DISENTANGLEMENT.template
    with pytest.raises(ValueError, match="cannot write a prompt"):
        prompt_from_llm(DISENTANGLEMENT, OfflineBackend())


def test_check_template_rules():
    assert check_template("Prompt template: '{{latent}} from {low} to {high}.'", DISENTANGLEMENT) == "{latent} from {low} to {high}."
    assert "{property}" in meta_prompt(CONDITIONAL)
    with pytest.raises(TemplateError, match=r"\{property\} are missing"):
        check_template("How does {latent} change things?", CONDITIONAL)
    assert check_template("How does {latent} change '{property}'?", CONDITIONAL)
    with pytest.raises(TemplateError, match="at most"):
        check_template("{latent} " + "x" * 3000, DISENTANGLEMENT)
    with pytest.raises(TemplateError, match="not a plain name"):
        check_template("{latent} {0}", DISENTANGLEMENT)


def test_cli_prompt_from_llm(tiny_vae, server, tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptFromLLMWarning)
        assert run(tiny_vae, server, out, "--no-cache", "--prompt-from-llm") == 0
    printed = capsys.readouterr()
    assert "prompt template (llm): LLMTEMPLATE" in printed.err
    chat = server.chat_requests
    assert META_MARKER in " ".join(chat[0].text_parts())
    explain = chat[1:]
    assert len(explain) == 3
    assert all(" ".join(r.text_parts()).startswith("LLMTEMPLATE: the grid shows latent z") for r in explain)
    assert entries(out)["z0"]["explanation"] == Z0
    # the template request belongs to no latent, but its tokens are part of the run's total
    usage = read_results(out / "results.json")["usage"]
    assert usage["requests"] == 4 and usage["prompt_tokens"] == 4 * server.prompt_tokens
    assert "in 4 requests" in printed.out
    # the template prompt renders the same way build_prompt does for a real traversal
    bias = dataclasses.replace(DISENTANGLEMENT, template=LLM_TEMPLATE)
    prompt = build_prompt(bias, Traversal("z4", torch.zeros(1, 2, 2, 3, 8, 8), torch.tensor([-1.0, 1.0]), "set"))
    assert prompt.text.startswith("LLMTEMPLATE: the grid shows latent z4 from -1 to +1")


# -- secrets, fatal client errors, token accounting, paid answers (issues 11 and 16) ----------------


def test_credentials_and_key_are_scrubbed_from_every_output(tiny_vae, tmp_path, capsys):
    password = "pw-SECRET-90210"
    echo = f"The object moves left to right. (key {KEY}, password {password})"
    with LoopbackServer(answer=lambda req, i: echo if latent_of(req) == "z0" else answer(req, i)) as server:
        server.push(Fault.status(500, message=f"upstream said {KEY} {password}"))
        url = server.url.replace("http://", f"http://alice:{password}@")
        out, cache = tmp_path / "run", tmp_path / "cache"
        code = main(["explain", "--model", str(tiny_vae), "--backend", "openai:test-model", "--base-url", url,
                     "--samples", "3", "--latents", "0,1,2", "--similarity", "bow", "--out", str(out), "--quiet",
                     "--timeout", "5", "--cache-dir", str(cache)])
    captured = capsys.readouterr()
    assert code in (0, 1)
    data = read_results(out / "results.json")
    assert data["backend"]["base_url"].startswith("http://***@127.0.0.1")
    assert "[redacted]" in json.dumps(data)  # the echoed secrets were replaced, not dropped
    files = all_bytes(out) + all_bytes(cache)
    assert any(p.name == "report.html" for p, _ in files) and len(list(cache.rglob("*.json"))) >= 3
    for path, content in files:
        assert KEY.encode() not in content and password.encode() not in content, path
    for text in (captured.out, captured.err):
        assert KEY not in text and password not in text


@pytest.mark.parametrize("args, message", [
    (["--timeout", "inf"], "--timeout must be a finite number of seconds > 0, got inf"),
    (["--timeout", "nan"], "--timeout must be a finite number of seconds > 0, got nan"),
    (["--api-key-env", KEY], "--api-key-env takes the NAME of an environment variable"),
])
def test_non_finite_timeouts_and_keys_as_variable_names_are_refused(tiny_vae, server, tmp_path, capsys, args, message):
    assert run(tiny_vae, server, tmp_path / "never", "--no-cache", *args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert KEY not in captured.out + captured.err  # the key given as a name is not echoed back
    assert server.requests == [] and not (tmp_path / "never").exists()


def test_401_stops_the_run_at_once_with_exit_2(tiny_vae, tmp_path, capsys):
    with LoopbackServer(answer=answer, require_key="another-key") as server:
        out = tmp_path / "run"
        code = run(tiny_vae, server, out, "--no-cache", "--concurrency", "1")
        requests = len(server.chat_requests)
    err = capsys.readouterr().err
    assert code == 2 and requests == 1  # not one request per latent
    assert "authentication failed (HTTP 401)" in err and "Incorrect API key provided" in err and "--resume" in err
    data = read_results(out / "results.json")
    assert data["status"] != "complete" and "HTTP 401" in data["stopped"]


def test_max_tokens_above_the_context_stops_after_one_request(tiny_vae, tmp_path, capsys):
    message = "max_tokens=600 cannot be greater than max_model_len=512. Please request fewer output tokens."
    with LoopbackServer(answer=answer, respond=lambda req: Reply(400, {"object": "error", "message": message})) as server:
        code = run(tiny_vae, server, tmp_path / "run", "--no-cache", "--max-new-tokens", "600", "--concurrency", "1")
        requests = [r.n for r in server.chat_requests]
    err = capsys.readouterr().err
    assert code == 2 and requests == [5]  # at most one request per latent; never taken for "n unsupported"
    assert "--max-new-tokens" in err and "max_model_len=512" in err and "server rejected n" not in err


def test_a_server_that_rejects_n_still_gets_single_requests(tiny_vae, tmp_path):
    with LoopbackServer(answer=answer, reject_n=True) as server:
        assert run(tiny_vae, server, tmp_path / "run", "--no-cache", "--concurrency", "1") == 0
        sizes = [r.n for r in server.chat_requests]
    assert sizes[0] == 5 and sizes[1:] == [1] * 15  # the fallback is learned once, for the whole run


def test_finish_reasons_and_token_totals_reach_results_report_and_stdout(tiny_vae, server, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_vae, server, out, "--no-cache") == 0
    stdout = capsys.readouterr().out
    data = read_results(out / "results.json")
    # the loopback server reports 50 prompt tokens per request and 7 completion tokens per choice
    for entry in data["latents"]:
        assert entry["usage"] == {"prompt_tokens": 50, "completion_tokens": 35, "requests": 1}
        assert [r["finish_reason"] for r in entry["responses"]] == ["stop"] * 5
    assert data["usage"] == {"prompt_tokens": 150, "completion_tokens": 105, "requests": 3}
    assert "tokens: 150 prompt + 105 completion in 3 requests" in stdout
    assert "150 prompt + 105 completion tokens in 3 requests" in (out / "report.html").read_text()


def test_sigkill_mid_round_loses_no_answer_that_arrived(tiny_vae, tmp_path):
    """A run killed (SIGKILL) after 2 of its 3 requests were answered: the rerun asks only for the third."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    release = threading.Event()
    cache, out = tmp_path / "cache", tmp_path / "run"

    def hold_third(request):
        if request.ordinal >= 3:
            release.wait(60)
        return None

    with LoopbackServer(answer=answer, respond=hold_third) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "LATENTEXPLAINER_NO_PLUGINS": "1"}
        cmd = [sys.executable, "-m", "latentexplainer_plugin.cli", "explain", "--model", str(tiny_vae),
               "--backend", "openai:test-model", "--base-url", server.url, "--samples", "5", "--latents", "0,1,2",
               "--similarity", "bow", "--out", str(out), "--quiet", "--timeout", "60", "--cache-dir", str(cache)]
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while len(list(cache.rglob("*.json"))) < 10 and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.05)  # waiting for the answers on disk: the files are the synchronisation
            stored = len(list(cache.rglob("*.json")))
            assert child.poll() is None, child.stderr.read().decode()
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            release.set()
            if child.poll() is None:
                child.kill()
            child.stderr.close()
        assert stored == 10 and len(server.chat_requests) == 3  # 2 answered (5 answers each), 1 held
        server.reset()
        assert run(tiny_vae, server, out, "--cache-dir", str(cache), "--resume", "--timeout", "60") == 0
        assert len(server.chat_requests) == 1  # only the request whose answers never arrived
    assert sorted(entries(out)) == ["z0", "z1", "z2"]


def test_sigterm_with_requests_in_flight_exits_130_within_seconds_and_resumes(tiny_vae, tmp_path, capsys):
    import os
    import signal
    import threading
    import time

    arrived, release = threading.Event(), threading.Event()
    sent: list[float] = []

    def hold(request):
        if latent_of(request) != "z0":  # z0 is answered; z1 and z2 are held by the server
            arrived.set()
            release.wait(60)
        return None

    cache, out = tmp_path / "cache", tmp_path / "run"
    with LoopbackServer(answer=answer, respond=hold) as server:
        def terminate_when_held():
            if arrived.wait(60):
                deadline = time.monotonic() + 30
                while len(list(cache.rglob("*.json"))) < 5 and time.monotonic() < deadline:
                    time.sleep(0.02)  # z0's five answers are on disk before the signal
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGTERM)

        killer = threading.Thread(target=terminate_when_held)
        killer.start()
        try:
            code = run(tiny_vae, server, out, "--cache-dir", str(cache), "--timeout", "60", "--concurrency", "1")
            elapsed_after_signal = time.monotonic() - sent[0]
        finally:
            release.set()
            killer.join(60)
        err = capsys.readouterr().err
        assert code == 130 and "interrupted" in err and "--resume" in err
        assert read_results(out / "results.json")["status"] == "interrupted"
        assert len(list(cache.rglob("*.json"))) == 5  # z0's answers were kept
        assert elapsed_after_signal < 5  # the held request (60 s deadline) was abandoned, not waited for
        server.reset()
        server.respond = None
        assert run(tiny_vae, server, out, "--cache-dir", str(cache), "--timeout", "60", "--concurrency", "1", "--resume") == 0
        assert sorted(latent_of(r) for r in server.chat_requests) == ["z1", "z2"]  # z0 came from the cache


def test_a_server_gone_mid_run_stops_it_keeps_what_finished_and_resume_completes(tiny_vae, tmp_path, capsys):
    """The server answers latent z0, then goes away (connections refused): the run stops at once with
    exit 2 instead of failing latent after latent through every retry; z0 is kept; once the server is
    back (same address), --resume explains only the rest."""
    out = tmp_path / "run"
    chats = []

    def respond(req):
        if req.path.endswith("/chat/completions"):
            chats.append(req)
            if len(chats) == 2:  # the request for z1: the server goes down under it
                server.stop()
                return Reply(drop=True)
        return None

    server = LoopbackServer(answer=answer, respond=respond).start()
    port = server.port
    try:
        code = run(tiny_vae, server, out, "--no-cache", "--concurrency", "1", "--max-retries", "2")
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert code == 2 and len(chats) == 2, err  # z1's retries met a refused connection: no request for z2
    assert f"cannot reach http://127.0.0.1:{port}/v1/chat/completions after 3 attempts" in err
    assert "so the run stops here" in err and "fix the cause, then rerun the same command with --resume" in err
    data = read_results(out / "results.json")
    assert "cannot reach" in data["stopped"] and data["status"] != "complete"
    assert [e["id"] for e in data["latents"] if e["status"] == "ok"] == ["z0"]
    with LoopbackServer(answer=answer, port=port) as again:
        assert run(tiny_vae, again, out, "--no-cache", "--concurrency", "1", "--max-retries", "2", "--resume") == 0, capsys.readouterr().err
        asked = [latent_of(r) for r in again.chat_requests]
    assert asked == ["z1", "z2"]
    assert {e["id"]: e["status"] for e in read_results(out / "results.json")["latents"]} == {"z0": "ok", "z1": "ok", "z2": "ok"}
