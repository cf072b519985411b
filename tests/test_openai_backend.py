"""OpenAICompatBackend against the loopback server, and clean_response."""

from __future__ import annotations

import base64
import io
import time

import pytest
import torch
from PIL import Image

from latentexplainer_plugin.backends.base import BackendError, FatalBackendError
from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend
from latentexplainer_plugin.backends.responses import clean_response
from latentexplainer_plugin.types import Prompt, Response, Traversal

try:
    from tests.loopback_server import Fault, LoopbackServer, Reply, loopback  # noqa: F401
except ImportError:  # tests/ on sys.path (pytest rootdir-less import)
    from loopback_server import Fault, LoopbackServer, Reply, loopback  # type: ignore  # noqa: F401

KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def make_job(seed: int = 0, n_images: int = 2, system: str | None = "You describe images.") -> tuple[Traversal, Prompt]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 1, n_images, 3, 32, 32, generator=g)
    traversal = Traversal(latent_id=f"z{seed}", images=images, strengths=torch.linspace(-2, 2, n_images), rule="set", index=seed)
    pil = [
        Image.fromarray((images[0, 0, i].permute(1, 2, 0).numpy() * 255).astype("uint8"))
        for i in range(n_images)
    ]
    prompt = Prompt(text=f"What changes across these images? ({seed})", images=pil, bias="strip", system=system)
    return traversal, prompt


def backend_for(server: LoopbackServer, **kw) -> OpenAICompatBackend:
    kw.setdefault("timeout", 5)
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 1.0)
    return OpenAICompatBackend(model="test-model", base_url=server.url, **kw)


# -- request shape ---------------------------------------------------------------------------


def test_request_carries_images_text_system_and_n(loopback):
    loopback.answer = "Sure! Here is the explanation: **The square moves right.**"
    traversal, prompt = make_job(n_images=3)
    with backend_for(loopback) as backend:
        out = backend.explain(traversal, prompt, 4)
    assert [r.text for r in out] == ["The square moves right."] * 4
    assert all(r.ok and not r.abstained for r in out)
    assert all(r.meta["model"] == "test-model" and r.meta["attempts"] == 1 and "latency_s" in r.meta for r in out)

    (req,) = loopback.requests
    assert req.path == "/v1/chat/completions" and req.method == "POST"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    body = req.body
    assert body["model"] == "test-model" and body["n"] == 4
    assert body["temperature"] == 1.0 and body["max_tokens"] == 200
    assert body["messages"][0] == {"role": "system", "content": "You describe images."}
    user = body["messages"][1]
    assert user["role"] == "user"
    assert user["content"][0] == {"type": "text", "text": prompt.text}  # text first, then images
    urls = req.image_urls()
    assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
    decoded = Image.open(io.BytesIO(base64.b64decode(urls[1].split(",", 1)[1])))
    assert decoded.size == (32, 32)
    assert decoded.convert("RGB").tobytes() == prompt.images[1].convert("RGB").tobytes()


def test_no_system_message_when_unset(loopback):
    traversal, prompt = make_job(system=None)
    with backend_for(loopback) as backend:
        backend.explain(traversal, prompt, 1)
    (req,) = loopback.requests
    assert [m["role"] for m in req.body["messages"]] == ["user"]
    assert "n" not in req.body  # n=1 sends no n


def test_fallback_to_parallel_singles_when_server_ignores_n(loopback):
    loopback.supports_n = False
    loopback.answer = lambda req, i: f"answer {req.ordinal}"
    traversal, prompt = make_job()
    with backend_for(loopback) as backend:
        out = backend.explain(traversal, prompt, 5)
        assert len(out) == 5 and all(r.ok for r in out)
        assert len({r.text for r in out}) == 5
        assert [r.n for r in loopback.requests] == [5, 1, 1, 1, 1]
        # learned: the next call goes straight to single requests
        loopback.reset()
        backend.explain(traversal, prompt, 3)
        assert [r.n for r in loopback.requests] == [1, 1, 1]


def test_fallback_when_server_rejects_n(loopback):
    loopback.reject_n = True
    traversal, prompt = make_job()
    with backend_for(loopback) as backend:
        out = backend.explain(traversal, prompt, 3)
    assert len(out) == 3 and all(r.ok for r in out)
    assert [r.n for r in loopback.requests] == [3, 1, 1, 1]


def test_use_n_false_always_singles_and_true_reports_missing(loopback):
    traversal, prompt = make_job()
    with backend_for(loopback, use_n=False) as backend:
        assert len(backend.explain(traversal, prompt, 3)) == 3
    assert [r.n for r in loopback.requests] == [1, 1, 1]
    loopback.reset()
    loopback.supports_n = False
    with backend_for(loopback, use_n=True) as backend:
        out = backend.explain(traversal, prompt, 3)
    assert [r.ok for r in out] == [True, False, False]
    assert "1 of 3 choices" in out[1].error
    assert len(loopback.requests) == 1


# -- retries ---------------------------------------------------------------------------------


def test_retries_on_429_and_500_then_success(loopback):
    loopback.push(Fault.status(429), Fault.status(500), Fault.status(503))
    traversal, prompt = make_job()
    with backend_for(loopback) as backend:
        out = backend.explain(traversal, prompt, 2)
    assert len(loopback.requests) == 4
    assert all(r.ok for r in out) and out[0].meta["attempts"] == 4


def test_retry_after_is_honoured_and_capped(loopback):
    loopback.push(Fault.status(429, retry_after=0.3))
    traversal, prompt = make_job()
    with backend_for(loopback, backoff_base=0.0) as backend:
        start = time.monotonic()
        out = backend.explain(traversal, prompt, 1)
        elapsed = time.monotonic() - start
    assert out[0].ok and len(loopback.requests) == 2
    assert elapsed >= 0.28
    gap = loopback.requests[1].time - loopback.requests[0].time
    assert gap >= 0.28

    loopback.reset()
    loopback.push(Fault.status(429, retry_after=30))  # capped by backoff_max
    with backend_for(loopback, backoff_max=0.1) as backend:
        start = time.monotonic()
        assert backend.explain(traversal, prompt, 1)[0].ok
        assert time.monotonic() - start < 2.0


def test_timeout_then_retry(loopback):
    loopback.push(Fault.slow(0.6))
    traversal, prompt = make_job()
    with backend_for(loopback, timeout=0.2) as backend:
        out = backend.explain(traversal, prompt, 1)
    assert out[0].ok and out[0].meta["attempts"] == 2
    assert len(loopback.requests) == 2


def test_dropped_connection_and_malformed_json_are_retried(loopback):
    loopback.push(Fault.drop(), Fault.malformed(), Fault.no_choices())
    traversal, prompt = make_job()
    with backend_for(loopback) as backend:
        out = backend.explain(traversal, prompt, 1)
    assert out[0].ok and out[0].meta["attempts"] == 4


def test_retries_exhausted_give_failed_responses(loopback):
    loopback.push(*[Fault.malformed()] * 3)
    traversal, prompt = make_job()
    with backend_for(loopback, max_retries=2) as backend:
        out = backend.explain(traversal, prompt, 3)
    assert len(out) == 3 and all(r.text is None and "malformed JSON" in r.error for r in out)
    assert "gave up after 3 attempts" in out[0].error
    assert len(loopback.requests) == 3


def test_bad_request_is_not_retried(loopback):
    loopback.push(Fault.status(400, message="image too large"))
    traversal, prompt = make_job()
    with backend_for(loopback) as backend:
        out = backend.explain(traversal, prompt, 1)
    assert out[0].text is None and "HTTP 400" in out[0].error and "image too large" in out[0].error
    assert len(loopback.requests) == 1


def test_empty_content_is_a_failed_sample_not_retried(loopback):
    loopback.push(Fault.empty())
    traversal, prompt = make_job()
    with backend_for(loopback) as backend:
        out = backend.explain(traversal, prompt, 2)
    assert [r.error for r in out] == ["empty response", "empty response"]
    assert len(loopback.requests) == 1


def test_401_fails_fast_without_retry(loopback):
    loopback.require_key = "another-key"
    traversal, prompt = make_job()
    with backend_for(loopback, backoff_base=1.0) as backend:
        start = time.monotonic()
        with pytest.raises(BackendError) as info:
            backend.explain(traversal, prompt, 3)
    assert time.monotonic() - start < 1.0
    assert len(loopback.requests) == 1
    message = str(info.value)
    assert "authentication failed (HTTP 401)" in message and "$OPENAI_API_KEY" in message
    assert loopback.url in message


def test_missing_key_fails_before_any_request(loopback, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(BackendError, match=r"No API key: set the OPENAI_API_KEY environment variable \(or choose"):
        backend_for(loopback)
    with pytest.raises(BackendError, match="set the MY_KEY environment variable"):
        backend_for(loopback, api_key_env="MY_KEY")
    monkeypatch.setenv("MY_KEY", "   ")
    with pytest.raises(BackendError, match="MY_KEY"):
        backend_for(loopback, api_key_env="MY_KEY")
    assert loopback.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/v1", "localhost:8000/v1", "", "http://"])
def test_base_url_must_be_http(url):
    with pytest.raises(ValueError, match="base_url") as info:
        OpenAICompatBackend(model="m", base_url=url)
    assert repr(url) in str(info.value)


def test_unreachable_server_raises_backend_error():
    with LoopbackServer() as server:
        url = server.url
    traversal, prompt = make_job()
    with OpenAICompatBackend(model="m", base_url=url, max_retries=1, backoff_base=0.01, timeout=2) as backend:
        with pytest.raises(BackendError, match="cannot reach"):
            backend.explain(traversal, prompt, 1)
        # refused through every retry: every further request would be too, so explain_many stops the run
        with pytest.raises(FatalBackendError, match="every further request would fail too, so the run stops here"):
            backend.explain_many([(traversal, prompt, 1), (traversal, prompt, 1)])


def test_key_never_leaks(loopback):
    # the server echoes the key in its error text; answers, errors, meta, describe, exceptions stay clean
    loopback.push(Fault.status(400, message=f"bad key {KEY} for request"), Fault.status(500, message=KEY))
    loopback.push(*[Fault.status(500, message=f"oops {KEY}")] * 3)
    traversal, prompt = make_job()
    with backend_for(loopback, max_retries=2, use_n=False) as backend:
        out = backend.explain(traversal, prompt, 1)  # 400
        out += backend.explain(traversal, prompt, 1)  # 500 x3 → failed
        out += backend.explain(traversal, prompt, 2)  # ok
        texts = [repr(backend.describe()), repr(backend)]
        loopback.require_key = "other"
        with pytest.raises(BackendError) as info:
            backend.explain(traversal, prompt, 1)
    texts.append(str(info.value))
    texts.append(repr(info.value))
    for response in out:
        texts += [str(response.text), str(response.error), repr(response.meta)]
    assert not out[0].ok and not out[1].ok and out[2].ok
    assert "***" in out[0].error  # scrubbed, not dropped
    for text in texts:
        assert KEY not in text


# -- concurrency -----------------------------------------------------------------------------


def test_explain_many_is_concurrent_and_bounded(loopback):
    loopback.delay = 0.2
    jobs = [(*make_job(i), 1) for i in range(10)]
    with backend_for(loopback, concurrency=8) as backend:
        backend.explain(*make_job(99), 1)  # warm up: client, connection setup
        loopback.reset()
        start = time.monotonic()
        results = backend.explain_many(jobs)
        elapsed = time.monotonic() - start
    assert all(isinstance(r, list) and len(r) == 1 and r[0].ok for r in results)
    assert len(loopback.requests) == 10
    # sequential would take >= 2.0 s; two waves (8 + 2) take ~0.45 s; slack for a loaded machine
    assert elapsed < 1.5
    assert 4 <= loopback.max_in_flight <= 8
    # answers stay with their job
    asked = {r.text_parts()[0] for r in loopback.requests}
    assert asked == {p.text for _, p, _ in jobs}


def test_in_flight_bound_holds_across_jobs_and_samples(loopback):
    loopback.delay = 0.05
    loopback.supports_n = False
    jobs = [(*make_job(i), 4) for i in range(6)]
    with backend_for(loopback, concurrency=3) as backend:
        results = backend.explain_many(jobs)
    assert all(len(r) == 4 and all(x.ok for x in r) for r in results)
    assert loopback.max_in_flight <= 3


def test_flaky_server_every_job_gets_n_responses(loopback):
    loopback.fail_rate = 0.3
    loopback.slow_rate = 0.1
    loopback.slow_delay = 0.3
    loopback.seed = 7
    loopback.answer = lambda req, i: f"The hue shifts ({req.ordinal}.{i})."
    jobs = [(*make_job(i), 3) for i in range(12)]
    with backend_for(loopback, concurrency=6, max_retries=1, timeout=0.2, use_n=False) as backend:
        results = backend.explain_many(jobs)
    assert len(results) == 12
    ok = failed = 0
    for result in results:
        assert isinstance(result, list) and len(result) == 3
        for r in result:
            assert isinstance(r, Response)
            assert (r.ok and r.text) or (r.text is None and r.error)
            ok += r.ok
            failed += not r.ok
    assert ok + failed == 36 and ok > 0
    assert len(loopback.requests) > 36  # faults were injected and retried
    errors = {r.error.split(" from ")[0].split(" after ")[0] for res in results for r in res if not r.ok}
    assert errors <= {"HTTP 500", "request timed out"}


def test_one_failing_job_does_not_lose_others(loopback):
    def respond(req):
        if "(3)" in req.text_parts()[0]:
            return Fault.status(500, message="this one is broken")
        return None

    loopback.respond = respond
    jobs = [(*make_job(i), 2) for i in range(5)]
    with backend_for(loopback, max_retries=1) as backend:
        results = backend.explain_many(jobs)
    assert [r.ok for r in results[3]] == [False, False] and "this one is broken" in results[3][0].error
    assert all(isinstance(results[i], list) and len(results[i]) == 2 and all(r.ok for r in results[i]) for i in (0, 1, 2, 4))


def test_describe_and_validation():
    backend = OpenAICompatBackend(model="gpt-x", base_url="http://127.0.0.1:9/v1/")
    d = backend.describe()
    assert d["name"] == "openai" and d["model"] == "gpt-x" and d["base_url"] == "http://127.0.0.1:9/v1"
    assert backend.url == "http://127.0.0.1:9/v1/chat/completions"
    assert OpenAICompatBackend.needs_key is True
    with pytest.raises(ValueError, match="concurrency"):
        OpenAICompatBackend(model="m", concurrency=0)


# -- clean_response --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, text",
    [
        ("The circle grows larger.", "The circle grows larger."),
        ("Sure! Here is the explanation: The circle grows larger.", "The circle grows larger."),
        ("Certainly. Here's my explanation:\nThe circle grows.", "The circle grows."),
        ("Explanation: the background darkens", "the background darkens"),
        ("**The circle grows larger.**", "The circle grows larger."),
        ("## Explanation\nThe circle moves up.", "The circle moves up."),
        ("- The circle moves up.\n- It also shrinks.", "The circle moves up. It also shrinks."),
        ('"The square rotates clockwise."', "The square rotates clockwise."),
        ("“The square rotates.”", "The square rotates."),
        ("The square rotates. Let me know if you need more detail!", "The square rotates."),
        ("The square rotates.\n\nI hope this helps!", "The square rotates."),
        ("  Answer: *The hue* shifts from red to blue.  ", "The hue shifts from red to blue."),
        ("The object's size changes", "The object's size changes"),
        ("1. The circle grows\n2. It turns red", "The circle grows. It turns red."),
        ("> The circle grows.", "The circle grows."),
        ("'Big' and 'small' alternate", "'Big' and 'small' alternate"),
    ],
)
def test_clean_response_strips_boilerplate(raw, text):
    r = clean_response(raw)
    assert r.text == text and r.error is None and not r.abstained


@pytest.mark.parametrize("raw", [None, "", "   \n ", "Sure!", "Sure! Here is the explanation:", '""', "**  **", "Let me know if you need anything else."])
def test_clean_response_empty(raw):
    r = clean_response(raw)
    assert r.text is None and r.error == "empty response" and not r.ok


@pytest.mark.parametrize(
    "raw, abstained",
    [
        ("There is no visible change across the images.", True),
        ("Nothing changes.", True),
        ("I cannot tell what changes.", True),
        ("I can't determine what varies here.", True),
        ("I can’t determine what varies here.", True),
        ("The images are identical.", True),
        ("All images look the same.", True),
        ("No noticeable difference between the frames.", True),
        ("There is no change across the images.", True),
        ("I see no changes.", True),
        ("Nothing changes except the circle turns red.", False),
        ("The circle makes no change in colour while it grows.", False),
        ("No visible change, only the brightness increases.", False),
        ("It is hard to say, but the circle grows.", False),
        ("No visible change other than the brightness increasing.", False),
        ("The circle grows larger.", False),
        ("The square changes from small to large.", False),
    ],
)
def test_clean_response_abstentions(raw, abstained):
    r = clean_response(raw)
    assert r.ok and r.abstained is abstained


# -- fatal client errors (401/403/404, 400s that every request would get) --------------------


@pytest.mark.parametrize("code", [401, 403, 404])
def test_fatal_status_stops_explain_many_at_once(loopback, code):
    loopback.respond = lambda req: Fault.status(code, message="nope")
    jobs = [(*make_job(i), 2) for i in range(10)]
    with backend_for(loopback, concurrency=2) as backend:
        with pytest.raises(FatalBackendError) as info:
            backend.explain_many(jobs)
    # each of the 2 workers may have sent one request before the first error stopped the rest
    assert 1 <= len(loopback.requests) <= 2
    assert f"HTTP {code}" in str(info.value)


VLLM_CONTEXT = "max_tokens=600 cannot be greater than max_model_len=512. Please request fewer output tokens."


def test_context_length_400_stops_at_the_first_request_and_names_the_flag(loopback):
    loopback.respond = lambda req: Reply(400, {"object": "error", "message": VLLM_CONTEXT, "type": "BadRequestError", "code": 400})
    jobs = [(*make_job(i), 3) for i in range(6)]
    with backend_for(loopback, concurrency=1, max_tokens=600) as backend:
        with pytest.raises(FatalBackendError) as info:
            backend.explain_many(jobs)
    assert len(loopback.requests) == 1 and loopback.requests[0].n == 3  # never taken for "n unsupported"
    message = str(info.value)
    assert "The prompt plus max_new_tokens=600 do not fit the model's context: lower max_new_tokens=" in message
    assert "max_model_len=512" in message and "--" not in message  # library words; the CLI prints --max-new-tokens


@pytest.mark.parametrize("message", ["'max_tokens' is too large: 600. This model supports at most 512 completion tokens",
                                     "This model's maximum context length is 512 tokens. However, you requested 700 tokens"])
def test_other_context_length_wordings_are_fatal(loopback, message):
    loopback.respond = lambda req: Fault.status(400, message=message)
    with backend_for(loopback) as backend:
        with pytest.raises(FatalBackendError, match="lower max_new_tokens="):
            backend.explain_many([(*make_job(i), 3) for i in range(3)])
    assert len(loopback.requests) <= 3


def test_same_client_error_twice_in_a_row_stops_the_run(loopback):
    loopback.respond = lambda req: Fault.status(400, message="unsupported image format")
    jobs = [(*make_job(i), 1) for i in range(8)]
    with backend_for(loopback, concurrency=1) as backend:
        with pytest.raises(FatalBackendError) as info:
            backend.explain_many(jobs)
    assert len(loopback.requests) == 2
    assert "unsupported image format" in str(info.value) and "2 requests in a row" in str(info.value)


def test_a_400_not_about_n_fails_that_request_only(loopback):
    def respond(req):
        return Fault.status(400, message="image too large") if "(1)" in req.text_parts()[0] else None

    loopback.respond = respond
    jobs = [(*make_job(i), 3) for i in range(3)]
    with backend_for(loopback, concurrency=1) as backend:
        results = backend.explain_many(jobs)
        later = backend.explain(*make_job(5), 3)
    assert all(r.ok for r in results[0]) and all(r.ok for r in results[2]) and all(r.ok for r in later)
    assert all(not r.ok and "image too large" in r.error for r in results[1])
    assert [r.n for r in loopback.requests] == [3, 3, 3, 3]  # n kept working: no switch to singles


def test_a_400_that_a_request_without_n_does_not_get_means_n_is_unsupported(loopback):
    def respond(req):  # a server whose message does not say which parameter it dislikes
        return Fault.status(400, message="unsupported parameter combination") if req.n > 1 else None

    loopback.respond = respond
    with backend_for(loopback) as backend:
        out = backend.explain(*make_job(0), 3)
        again = backend.explain(*make_job(1), 2)
    assert all(r.ok for r in out + again)
    assert [r.n for r in loopback.requests] == [3, 1, 1, 1, 1, 1]


# -- deadlines, size caps, interrupts ---------------------------------------------------------


@pytest.mark.parametrize("headers", [False, True])
def test_a_trickling_server_cannot_outlast_the_deadline(loopback, headers):
    loopback.push(Fault.trickle(seconds=30, interval=0.5, headers=headers))
    with backend_for(loopback, timeout=1, max_retries=0) as backend:
        start = time.monotonic()
        out = backend.explain(*make_job(), 1)
        elapsed = time.monotonic() - start
    assert not out[0].ok and "timed out after 1 s" in out[0].error
    assert elapsed < 3.0  # the server would have talked for 30 s


@pytest.mark.parametrize("bomb", [False, True])
def test_oversized_bodies_are_refused_and_retried(loopback, bomb):
    loopback.push(Fault.oversized(gzip_bomb=bomb))
    with backend_for(loopback) as backend:
        out = backend.explain(*make_job(), 1)
    assert out[0].ok and out[0].meta["attempts"] == 2
    loopback.reset()
    loopback.push(*[Fault.oversized(gzip_bomb=bomb)] * 2)
    with backend_for(loopback, max_retries=1) as backend:
        out = backend.explain(*make_job(), 1)
    assert not out[0].ok and "too large" in out[0].error


@pytest.mark.parametrize("bad", ["inf", "nan", "-1", "0"])
def test_non_finite_or_non_positive_timeouts_are_refused(bad):
    with pytest.raises(ValueError, match="timeout must be a finite number"):
        OpenAICompatBackend(model="m", base_url="http://127.0.0.1:9/v1", timeout=float(bad))


@pytest.mark.parametrize("jobs", [6, 1])
@pytest.mark.parametrize("to", ["process", "another thread"])
def test_sigterm_ends_explain_many_at_once_with_requests_in_flight(loopback, to, jobs):
    """``to``: the signal goes to the process (the kernel picks a thread) or, as it may, to a thread that is not
    the waiting main thread: the run must end at once either way, with many requests in flight or one."""
    import os
    import signal
    import threading

    arrived = threading.Event()
    release = threading.Event()

    def respond(req):
        if len(loopback.requests) >= min(3, jobs):
            arrived.set()
        release.wait(30)  # the server holds every request
        return None

    def terminate(signum, frame):
        raise KeyboardInterrupt

    loopback.respond = respond
    previous = signal.signal(signal.SIGTERM, terminate)
    def send() -> None:
        if not arrived.wait(20):
            return
        if to == "process":
            os.kill(os.getpid(), signal.SIGTERM)
        else:  # delivered to this (killer) thread, not to the main thread that waits for the requests
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    killer = threading.Thread(target=send)
    try:
        with backend_for(loopback, timeout=60, concurrency=4) as backend:
            killer.start()
            start = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                backend.explain_many([(*make_job(i), 2) for i in range(jobs)])
            elapsed = time.monotonic() - start
    finally:
        release.set()
        killer.join()
        signal.signal(signal.SIGTERM, previous)
    assert arrived.is_set() and elapsed < 5.0


# -- answers that are not explanations, token accounting --------------------------------------


def test_cut_off_filtered_empty_and_oversized_answers_are_failed_samples(loopback):
    long = "The square grows. " * 300  # > 4000 characters
    loopback.push(Fault.choices(("The square grows and", "length"), ("The square grows.", "content_filter"),
                                ("   ", "stop"), (long, "stop"), ("The square grows.", "stop"),
                                usage={"prompt_tokens": 120, "completion_tokens": 90}))
    with backend_for(loopback) as backend:
        out = backend.explain(*make_job(), 5)
    assert len(loopback.requests) == 1
    assert out[0].error == "truncated: finish_reason=length (raise max_new_tokens=, now 200)"  # library words in results
    assert out[0].meta["raw_text"] == "The square grows and"
    assert out[1].error.startswith("filtered: finish_reason=content_filter")
    assert out[2].error == "empty response"
    assert out[3].error.startswith(f"answer too long: {len(long)} characters")
    assert out[4].ok and out[4].text == "The square grows."
    assert [r.meta["finish_reason"] for r in out] == ["length", "content_filter", "stop", "stop", "stop"]
    # the request's tokens are counted once, on its first answer
    assert out[0].meta["usage"] == {"prompt_tokens": 120, "completion_tokens": 90, "requests": 1}
    assert all("usage" not in r.meta for r in out[1:])


def test_usage_per_request_with_singles(loopback):
    loopback.supports_n = False
    with backend_for(loopback) as backend:
        out = backend.explain(*make_job(), 3)
    assert len(loopback.requests) == 3
    # the first request (n=3) returned 1 choice; two single requests fetched the rest
    assert [r.meta["usage"] for r in out] == [{"prompt_tokens": 50, "completion_tokens": 7, "requests": 1}] * 3


# -- secrets ----------------------------------------------------------------------------------


def test_credentials_in_the_base_url_and_echoed_keys_are_scrubbed(loopback):
    user, password = "alice", "pw-SECRET-771"
    url = loopback.url.replace("http://", f"http://{user}:{password}@")
    loopback.answer = f"The square grows. Your key is {KEY} and the password {password}."
    loopback.push(Fault.status(400, message=f"bad auth {password} / {KEY}"))
    with OpenAICompatBackend(model="m", base_url=url, timeout=5) as backend:
        failed = backend.explain(*make_job(), 1)
        ok = backend.explain(*make_job(1), 1)
    texts = [repr(backend.describe()), repr(backend), backend.url, backend.base_url, repr(backend.sampling_params())]
    texts += [str(r.text) + str(r.error) + repr(r.meta) for r in failed + ok]
    assert "***@127.0.0.1" in backend.base_url
    assert "***" in failed[0].error and ok[0].text == "The square grows. Your key is [redacted] and the password [redacted]."
    for text in texts:
        assert password not in text and KEY not in text


@pytest.mark.parametrize("name", ["sk-abc123SECRETKEY", "has space", "1ABC", ""])
def test_a_key_given_where_a_variable_name_belongs_is_refused_without_echo(name):
    with pytest.raises(ValueError) as info:
        OpenAICompatBackend(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=name)
    assert "NAME of an environment variable" in str(info.value)
    if name:
        assert name not in str(info.value)
