"""An explainer backend for any OpenAI-compatible ``/chat/completions`` endpoint.

Works with the OpenAI API and with servers that copy it (vLLM, llama.cpp server, Ollama's
``/v1``, LM Studio, LiteLLM, OpenRouter, ...). Images travel as base64 PNG data URLs.

Why ``httpx`` and not the official ``openai`` package
-----------------------------------------------------
The explainer needs exact control over what happens between the first request and the n-th
answer, and the official client decides much of that on its own:

* retries: ``openai`` retries by itself (its own count, backoff and status list); here one policy
  covers 429, 5xx, timeouts, dropped connections *and* malformed bodies, with full-jitter
  exponential backoff and a ``Retry-After`` (or ``retry-after-ms``) header capped by ``backoff_max``;
* ``n``: many compatible servers ignore ``n`` (return one choice) or reject it (HTTP 400); we
  detect both and fill the missing samples with parallel single requests;
* failures per sample: a failed sample must become ``Response(text=None, error=...)`` while
  401/403/404 must stop at once with a message that names the key's variable, not a stack of
  SDK exception types;
* a single bound on requests in flight across all jobs (a semaphore around each HTTP call);
* one small dependency (``httpx`` is already in the environment; ``openai`` pulls in pydantic
  models, ``distro``, ``jiter`` ... and changes its request shape between versions).

The request body is the plain chat-completions schema, so nothing is lost by not using the SDK.

Key hygiene: the key is read from the environment variable once, kept in a private header dict,
and never put into :meth:`describe`, log records, exception messages or ``Response.meta``
(server error text and answers are scrubbed of it, and of the base URL's credentials, which are
shown redacted as ``http://***@host/...``).

Deadlines: ``timeout`` bounds a whole request, not one socket operation. Each attempt opens its
own connection (no keep-alive) and a watchdog timer shuts that socket down at the deadline, so a
server that trickles its headers or body a byte at a time cannot hold a request longer; the body
is also read in chunks with a size cap (:data:`MAX_BODY_BYTES`, after decompression). Ctrl-C or
SIGTERM while :meth:`explain_many` waits shuts down every socket in flight and re-raises at once.

Answers that are not explanations (``finish_reason`` ``length`` or ``content_filter``, empty text,
more than :data:`MAX_ANSWER_CHARS` characters) are failed samples with the reason in ``error``; the
raw text stays in ``meta["raw_text"]``. Each answer's ``meta`` holds ``finish_reason``; the first
answer of each request holds the request's ``usage`` (prompt and completion tokens, counted once
however many choices the request returned).
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Annotated, Any, Callable, Optional
from urllib.parse import urlsplit

import httpx
from pydantic import AfterValidator, Field

from ..errors import OptionError
from ..options import ComponentOptions, EnvName, HttpUrl, NonNegativeFloat, NonNegativeInt, PositiveInt, validate_options
from ..redaction import redact_url, url_secrets  # noqa: F401 (re-exported)
from ..types import Prompt, Response, Traversal
from .base import Backend, BackendError, FatalBackendError
from .responses import EMPTY_ERROR, clean_response

__all__ = ["OpenAICompatBackend", "image_data_url", "redact_url", "check_env_name", "MAX_ANSWER_CHARS",
           "MAX_BODY_BYTES"]

log = logging.getLogger(__name__)

#: Longest answer (characters) taken as an explanation; longer ones are failed samples.
MAX_ANSWER_CHARS = 4000
#: Largest response body read, after decompression (a gzip bomb stops here).
MAX_BODY_BYTES = 4 * 1024 * 1024

_RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MIN_SECRET = 4  # shorter "secrets" (a 1-letter password) would blank out ordinary text
_REPEATS_FATAL = 2  # the same client error this many times in a row stops the run
# The waiting (main) thread wakes this often: a SIGTERM sent to the process may be delivered to a request thread,
# and CPython runs the handler in the main thread only when it wakes, not while it blocks on a lock without timeout.
_WAKE_S = 0.2
# A 400 about the n parameter: OpenAI's param "n", or the word n in the message ("n > 1 is not
# supported", "'n' must be 1"); never "can't" or "max_tokens=600".
_ABOUT_N = re.compile(r"(?<![\w.'\-])[`'\"]?n[`'\"]?(?![\w'\-])")
# The answer does not fit the model's context (vLLM, OpenAI, llama.cpp wordings).
_CONTEXT_LENGTH = re.compile(
    r"max_model_len|context length|context window|maximum context|too many tokens|"
    r"max_(?:completion_)?tokens['\"`]?\s*(?:=\s*\d+\s*)?(?:is too large|cannot be greater|must be less|exceeds|is greater)",
    re.I,
)


class _RequestFailed(Exception):
    """A request that produced no usable body: retries exhausted or a non-retryable 4xx."""

    def __init__(self, message: str, attempts: int, status: int | None = None, detail: str = "",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status
        self.detail = detail  # the server's message
        self.param = param


def check_env_name(name: Any) -> str:
    """``name`` when it is a valid environment variable name; else ValueError that does not echo it
    (a key pasted where a name belongs must not end up in a terminal or a log)."""
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ValueError(
            "api_key_env takes the NAME of an environment variable (letters, digits and _, not starting "
            "with a digit), e.g. OPENAI_API_KEY; the value given is not a name and is not shown, in case it is "
            "the key itself: export the key in a variable and pass that variable's name"
        )
    return name


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Open and close a TCP connection to the server of ``url`` (no request, no key sent), so an
    unreachable server fails before any model is loaded. Skipped when a proxy is configured."""
    import urllib.request

    parts = urlsplit(url)
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise OptionError("", [("base_url", f"{redact_url(url)!r} has an invalid port")]) from None
    if not host:
        return
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return  # the proxy decides what is reachable
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        raise OptionError("", [("base_url", f"cannot reach {parts.scheme}://{host}:{port} ({reason}): is the server running "
                                            "and is {flag}right? (default https://api.openai.com/v1; Ollama: http://localhost:11434/v1)")]) from None


def image_data_url(image: Any) -> str:
    """A ``data:image/png;base64,...`` URL for a PIL image (or bytes that already hold a PNG)."""
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif hasattr(image, "save") and hasattr(image, "mode"):
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise TypeError(f"prompt images must be PIL images or PNG bytes, got {type(image).__name__}")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Stopped(Exception):
    """The call was stopped (a fatal error elsewhere, or Ctrl-C): no new request is started."""


class _Call:
    """State shared by every request of one ``explain`` / ``explain_many`` call."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.aborted = False
        self.fatal: FatalBackendError | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.stop.is_set():
            raise _Stopped("stopped: " + (str(self.fatal) if self.fatal else "interrupted"))

    def fail(self, exc: FatalBackendError) -> None:
        """Keep the first fatal error; start no new request (those in flight finish)."""
        with self._lock:
            if self.fatal is None:
                self.fatal = exc
        self.stop.set()


class _Watch:
    """The socket of one request attempt, so a watchdog can end it at its deadline (or on Ctrl-C)."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def trace(self, event: str, info: dict) -> None:
        """httpcore's ``trace`` extension: remember the socket of each connection this request opens."""
        if event.endswith(("connect_tcp.complete", "start_tls.complete", "connect_unix_socket.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with self._lock:
                    self._sock = sock
                    fired = self.fired
                if fired:
                    _shutdown(sock)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self._sock
        if sock is not None:
            _shutdown(sock)


def _result_waking(future: Future) -> Any:
    """``future.result()``, waking every ``_WAKE_S`` so that a signal handler (Ctrl-C, SIGTERM) runs at once."""
    while True:
        try:
            return future.result(timeout=_WAKE_S)
        except FutureTimeout:
            if future.done():  # the function itself raised a TimeoutError
                raise


def _shutdown(sock: socket.socket) -> None:
    try:  # wakes up a recv() blocked in another thread, unlike close()
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _positive_seconds(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number of seconds > 0, got {value} (the deadline of one whole request)")
    return value


class OpenAIOptions(ComponentOptions):
    """Options of the ``openai`` backend (``--backend openai:MODEL``)."""

    base_url: HttpUrl = Field("https://api.openai.com/v1", description="OpenAI-compatible API root (Ollama: http://localhost:11434/v1)")
    api_key_env: EnvName = Field("OPENAI_API_KEY", description="environment variable that holds the API key")
    timeout: Annotated[float, AfterValidator(_positive_seconds)] = Field(
        60.0, description="deadline in seconds of one whole HTTP request, body included")
    max_retries: NonNegativeInt = Field(4, description="retries after 429/5xx/timeouts/dropped connections")
    concurrency: PositiveInt = Field(8, description="most requests in flight at once")
    temperature: NonNegativeFloat = Field(1.0, description="sampling temperature sent to the server")
    max_new_tokens: PositiveInt = Field(200, description="most tokens per answer (sent as max_tokens)")
    cache_dir: Optional[str] = Field(None, description="response cache directory (default ~/.cache/latentexplainer/responses)")
    no_cache: bool = Field(False, description="neither read nor write the response cache")


class OpenAICompatBackend(Backend):
    """Explains a traversal by asking an OpenAI-compatible chat model ``n`` times.

    Args:
        model: model name sent in every request.
        base_url: API root (``.../v1``); ``/chat/completions`` is appended unless already there.
            Credentials in it (``http://user:pass@host``) are used, but never shown: ``base_url``,
            :meth:`describe`, errors and answers carry a redacted form.
        api_key_env: NAME of the environment variable that holds the key (read once, here).
        timeout: overall deadline in seconds of one HTTP request (connect, send, headers and the
            whole body), finite and > 0: a server that trickles bytes cannot hold a request longer.
        max_retries: retries after the first attempt for 429/5xx/timeouts/connection errors/
            malformed or oversized bodies.
        concurrency: most requests in flight at once, over all jobs of :meth:`explain_many`.
        temperature, max_tokens: sampling parameters sent to the server.
        use_n: True: always one request with ``n``; False: always n single requests; None: try
            ``n`` and fall back (for this and later calls) when the server returns fewer choices
            or rejects ``n`` (a 400 whose message is about ``n``, or that a request without ``n``
            does not get).
        backoff_base, backoff_max: full-jitter backoff, attempt k waits
            ``uniform(0, min(backoff_max, backoff_base * 2**k))``; ``Retry-After`` wins when
            present (capped by ``backoff_max``).

    401/403/404, a context-length 400 and the same 4xx twice in a row raise
    :class:`~latentexplainer_plugin.backends.base.FatalBackendError` from :meth:`explain_many`.
    """

    name = "openai"
    supports_images = True
    supports_n = True
    needs_key = True
    extra_capabilities = frozenset({"calls_model", "needs_network"})
    Options = OpenAIOptions

    @classmethod
    def preflight(cls, arg: str | None, options: dict[str, Any]) -> None:
        """A model name, a key in the environment, and a server that accepts a TCP connection
        (checked last: the only check that may wait)."""
        if not (arg or "").strip():
            raise OptionError("the openai backend", [("backend", "openai:MODEL needs a model name, e.g. openai:gpt-4o")])
        env = options.get("api_key_env") or "OPENAI_API_KEY"
        if not os.environ.get(env, "").strip():
            raise OptionError("", [("api_key_env", f"No API key: set the {env} environment variable "
                                                   "(or choose another variable with {flag}NAME)")])
        check_reachable(options.get("base_url") or "https://api.openai.com/v1", timeout=min(options.get("timeout") or 5.0, 10.0))

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60,
        max_retries: int = 4,
        concurrency: int = 8,
        temperature: float = 1.0,
        max_tokens: int = 200,
        use_n: bool | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 20,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        # the declared options check themselves (the same checks the command line runs): written once
        validate_options(OpenAIOptions, {"base_url": base_url, "api_key_env": api_key_env, "timeout": timeout,
                                      "max_retries": max_retries, "concurrency": concurrency,
                                      "temperature": temperature, "max_new_tokens": max_tokens}, "the openai backend")
        if not all(isinstance(b, (int, float)) and math.isfinite(b) and b >= 0 for b in (backoff_base, backoff_max)):
            raise ValueError(f"backoff_base and backoff_max must be finite and >= 0, got {backoff_base!r}, {backoff_max!r}")
        check_env_name(api_key_env)
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise BackendError(
                f"No API key: set the {api_key_env} environment variable "
                "(or choose another variable with api_key_env=NAME)"
            )
        self.model = model
        raw = base_url.rstrip("/")
        self._post_url = raw if raw.endswith("/chat/completions") else raw + "/chat/completions"
        self.base_url = redact_url(raw)  # what is shown and recorded; the real one is only sent
        self.url = redact_url(self._post_url)
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.use_n = use_n
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self._secrets = sorted({key, *url_secrets(base_url)}, key=len, reverse=True)
        self._headers = {"Authorization": f"Bearer {key}"}
        self._n_works: bool | None = use_n  # learned when use_n is None
        self._probed = False  # a 400 not about n was retried once without n
        self._token_field = "max_tokens"
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._client: httpx.Client | None = None
        self._live: set[_Watch] = set()
        self._last_client_error: str | None = None
        self._client_error_repeats = 0

    def __repr__(self) -> str:
        return f"OpenAICompatBackend(model={self.model!r}, base_url={self.base_url!r})"

    # -- public ------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": self.model,
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "use_n": self.use_n,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "concurrency": self.concurrency,
        }

    def sampling_params(self) -> dict:
        """What changes the answers (used in cache keys); not retry or concurrency settings."""
        return {"base_url": self.base_url, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def scrub(self, text: str, mark: str = "***") -> str:
        """``text`` with the key and the base URL's credentials replaced by ``mark``."""
        for secret in self._secrets:
            if len(secret) >= _MIN_SECRET:
                text = text.replace(secret, mark)
        return text

    def explain(self, traversal: Traversal, prompt: Prompt, n: int) -> list[Response]:
        call = _Call()
        try:
            return self._explain(prompt, n, call, None)
        except _Stopped as exc:  # a fatal error in a parallel sample stopped the rest
            if call.fatal is not None:
                raise call.fatal from None
            raise BackendError(str(exc)) from None

    def explain_many(
        self,
        jobs: list[tuple[Traversal, Prompt, int]],
        on_response: Callable[[int, int, Response], None] | None = None,
    ) -> list[list[Response] | BaseException]:
        """Explain ``jobs`` concurrently; see :meth:`Backend.explain_many`.

        A fatal error (bad key, wrong URL or model, a 400 that every request would get) starts no
        new request, lets those in flight finish (their answers still reach ``on_response``) and
        is raised. Ctrl-C / SIGTERM end every request in flight at once and are re-raised.
        """
        if not jobs:
            return []
        call = _Call()

        def run(item: tuple[int, tuple[Traversal, Prompt, int]]) -> list[Response] | BaseException:
            j, (_, prompt, n) = item
            emit = None if on_response is None else (lambda i, r: on_response(j, i, r))
            try:
                return self._explain(prompt, n, call, emit)
            except FatalBackendError as exc:
                call.fail(exc)
                return exc
            except Exception as exc:  # one job failing never loses the others
                return exc

        out = self._run_all(run, list(enumerate(jobs)), call, "explain")
        if call.fatal is not None:
            raise call.fatal
        return out

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> "OpenAICompatBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning ----------------------------------------------------------------------------
    def _explain(self, prompt: Prompt, n: int, call: _Call, emit: Callable[[int, Response], None] | None) -> list[Response]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        emit = emit or (lambda i, r: None)
        messages = self._messages(prompt)
        use_n = self.use_n if self.use_n is not None else self._n_works
        if n == 1 or use_n is False:
            return self._singles(messages, n, call, emit, 0)

        try:
            got = self._request(messages, n, call)
        except _RequestFailed as exc:
            if self.use_n is None and exc.status in (400, 422) and not _CONTEXT_LENGTH.search(exc.detail):
                if _about_n(exc):
                    log.info("server rejected n=%d (%s); using %d single requests", n, exc, n)
                    self._n_works = False
                    return self._singles(messages, n, call, emit, 0)
                with self._lock:
                    probe = self._n_works is None and not self._probed
                    self._probed = True
                if probe:  # is it n after all? one request without it tells
                    try:
                        first = self._request(messages, 1, call)[:1]
                    except _RequestFailed as again:
                        self._client_error(again)
                        return [self._failed(str(again), exc.attempts + again.attempts) for _ in range(n)]
                    log.info("server rejected n=%d (%s) but answered without n; using single requests", n, exc)
                    self._n_works = False
                    for i, response in enumerate(first):
                        emit(i, response)
                    return first + self._singles(messages, n - len(first), call, emit, len(first))
            self._client_error(exc)
            return [self._failed(str(exc), exc.attempts) for _ in range(n)]
        got = got[:n]
        for i, response in enumerate(got):
            emit(i, response)
        if len(got) == n:
            if self.use_n is None:
                self._n_works = True
            return got
        if self.use_n is True:
            missing = n - len(got)
            return got + [self._failed(f"server returned {len(got)} of {n} choices", 1) for _ in range(missing)]
        log.info("server returned %d of %d choices; asking for the rest one by one", len(got), n)
        self._n_works = False
        return got + self._singles(messages, n - len(got), call, emit, len(got))

    def _singles(self, messages: list[dict], count: int, call: _Call, emit: Callable[[int, Response], None],
                 offset: int) -> list[Response]:
        """``count`` one-choice requests, run in parallel (the semaphore bounds what is in flight)."""

        def one(i: int) -> Response:
            try:
                got = self._request(messages, 1, call)
            except _RequestFailed as exc:
                self._client_error(exc)
                return self._failed(str(exc), exc.attempts)
            response = got[0] if got else self._failed("server returned no choices", 1)
            emit(offset + i, response)
            return response

        return self._run_all(one, list(range(count)), call, "sample")

    def _run_all(self, fn: Callable[[Any], Any], items: list[Any], call: _Call, label: str) -> list[Any]:
        """``fn`` over ``items`` in threads. An exception from ``fn`` is raised after the others
        finish (a fatal one first stops new requests); Ctrl-C / SIGTERM (raised in the waiting
        thread) ends the requests in flight at once and does not wait for their threads. One item
        runs in a thread too: the main thread must stay free to take a signal the kernel delivered to
        another thread (blocked in a socket read it would wait for the response)."""
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(items)), thread_name_prefix=label)
        futures = [pool.submit(fn, item) for item in items]
        try:
            out = [_result_waking(f) for f in futures]
        except Exception as exc:
            if isinstance(exc, FatalBackendError):
                call.fail(exc)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        except BaseException:
            self._abort(call)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return out

    def _abort(self, call: _Call) -> None:
        """Ctrl-C / SIGTERM: start nothing new and end every request of ``call`` in flight now."""
        call.aborted = True
        call.stop.set()
        with self._lock:
            watches = [w for w in self._live if w.call is call]
        for watch in watches:
            watch.fire()

    def _client_error(self, exc: _RequestFailed) -> None:
        """Stop the run on a client error that every request would get: a context-length 400 at
        once, any other 4xx when the same one comes back twice in a row."""
        if exc.status is None or not 400 <= exc.status < 500:
            return
        what = f"HTTP {exc.status} from {self.url}: {exc.detail}"
        if _CONTEXT_LENGTH.search(exc.detail):
            raise FatalBackendError(
                f"{what}. The prompt plus max_new_tokens={self.max_tokens} do not fit the model's context: "
                "lower max_new_tokens= (or serve the model with a longer context)"
            )
        with self._lock:
            if exc.detail == self._last_client_error:
                self._client_error_repeats += 1
            else:
                self._last_client_error, self._client_error_repeats = exc.detail, 1
            repeats = self._client_error_repeats
        if repeats >= _REPEATS_FATAL:
            raise FatalBackendError(
                f"{what} ({repeats} requests in a row got this error; stopping instead of sending the rest). "
                f"Fix the request: {_request_hint(exc.detail)}"
            )

    # -- requests ----------------------------------------------------------------------------
    def _messages(self, prompt: Prompt) -> list[dict]:
        content: list[dict] = [{"type": "text", "text": prompt.text}]
        for image in prompt.images:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
        messages: list[dict] = []
        if prompt.system:
            messages.append({"role": "system", "content": prompt.system})
        messages.append({"role": "user", "content": content})
        return messages

    def _body(self, messages: list[dict], n: int) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            self._token_field: self.max_tokens,
        }
        if n > 1:
            body["n"] = n
        return body

    def _request(self, messages: list[dict], n: int, call: _Call) -> list[Response]:
        """One chat-completions call (with retries); its choices as checked Responses."""
        try:
            data, attempts, latency = self._post(self._body(messages, n), call)
        except _RequestFailed as exc:
            if (
                exc.status == 400
                and self._token_field == "max_tokens"
                and "max_completion_tokens" in exc.detail
            ):  # newer OpenAI models renamed the parameter
                self._token_field = "max_completion_tokens"
                data, attempts, latency = self._post(self._body(messages, n), call)
            else:
                raise
        with self._lock:
            self._last_client_error, self._client_error_repeats = None, 0
        return self._responses(data, attempts, latency)

    def _post(self, body: dict, call: _Call) -> tuple[dict, int, float]:
        client = self._get_client()
        attempts = 0
        last_error = "no attempt made"
        unreachable = False
        for attempt in range(self.max_retries + 1):
            call.check()
            attempts += 1
            with self._slots:
                call.check()
                outcome = self._attempt(client, body, call, attempts)
            if isinstance(outcome, tuple):
                return outcome
            last_error, retry_after, unreachable = outcome.error, outcome.retry_after, outcome.unreachable
            if attempt < self.max_retries:
                delay = self._backoff(attempt, retry_after)
                log.debug("attempt %d failed (%s); retrying in %.2f s", attempts, last_error, delay)
                call.stop.wait(delay)
        call.check()
        if unreachable:  # connection refused through every retry: each further request would fail the same way
            raise FatalBackendError(f"cannot reach {self.url} after {attempts} attempts: {last_error}. The server is "
                                    "down or its address is wrong: every further request would fail too, so the run "
                                    "stops here (finished latents are kept; start the server, then resume the run)")
        raise _RequestFailed(f"{last_error} (gave up after {attempts} attempts)", attempts)

    def _attempt(self, client: httpx.Client, body: dict, call: _Call, attempts: int) -> tuple[dict, int, float] | _Retry:
        """One HTTP attempt under an overall deadline: the parsed body, or why to retry."""
        started = time.monotonic()
        deadline = started + self.timeout
        watch = _Watch(call)
        timer = threading.Timer(self.timeout, watch.fire)
        timer.daemon = True
        with self._lock:
            self._live.add(watch)
        timer.start()
        try:
            with client.stream("POST", self._post_url, json=body, headers=self._headers,
                               extensions={"trace": watch.trace}) as reply:
                status = reply.status_code
                raw = _read_capped(reply, deadline)
        except _Oversized as exc:
            return _Retry(f"response from {self.url} is too large ({exc}; limit {MAX_BODY_BYTES} bytes)")
        except httpx.TimeoutException as exc:
            return _Retry(f"request timed out after {self.timeout:g} s ({type(exc).__name__})")
        except httpx.RequestError as exc:
            if call.aborted:
                raise _Stopped("interrupted") from None
            if watch.fired or time.monotonic() >= deadline:
                return _Retry(f"request timed out after {self.timeout:g} s (the overall deadline of one request)")
            unreachable = isinstance(exc, httpx.ConnectError)
            return _Retry(self.scrub(f"connection error at {self.url}: {type(exc).__name__}: {exc}"), unreachable=unreachable)
        finally:
            timer.cancel()
            with self._lock:
                self._live.discard(watch)
        latency = time.monotonic() - started
        message, param = self._error_detail(raw)
        if status in (401, 403):
            raise FatalBackendError(
                f"authentication failed (HTTP {status}) at {self.url}: check the key in ${self.api_key_env}"
                + (f" (server: {message})" if message else "")
            )
        if status == 404:
            raise FatalBackendError(
                f"HTTP 404 at {self.url}: check the base URL and the model name {self.model!r} ({message or '(empty body)'})"
            )
        if status in _RETRY_STATUS or status >= 500:
            return _Retry(f"HTTP {status} from {self.url}: {message or '(empty body)'}", _parse_retry_after(reply.headers))
        if status >= 400:
            raise _RequestFailed(f"HTTP {status} from {self.url}: {message or '(empty body)'}", attempts, status,
                                 detail=message, param=param)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _Retry(f"malformed JSON from {self.url}: {self._text_snippet(raw)}")
        choices = data.get("choices") if isinstance(data, dict) else None
        if isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
            return data, attempts, latency
        detail = data.get("error") if isinstance(data, dict) else None
        return _Retry(self.scrub(f"response from {self.url} has no choices" + (f": {detail}" if detail else ""))[:500])

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.backoff_max, retry_after)
        with self._lock:
            return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * (2**attempt)))

    def _responses(self, data: dict, attempts: int, latency: float) -> list[Response]:
        choices = sorted(
            data["choices"], key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0
        )
        usage = _usage(data.get("usage"))
        out = []
        for k, choice in enumerate(choices):
            message = choice.get("message") or {}
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # some servers answer with content parts
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            elif content is not None and not isinstance(content, str):
                content = str(content)
            if content is not None:
                content = self.scrub(content, "[redacted]")  # a model may echo a secret; "***" reads as markdown
            finish = choice.get("finish_reason")
            finish = finish if isinstance(finish, str) else None
            response = self._check_answer(content, finish)
            if response.text is None and response.error == EMPTY_ERROR and isinstance(message, dict) and message.get("refusal"):
                response.error = self.scrub(f"refused: {message['refusal']}")[:500]
            response.meta = {
                "model": self.scrub(data["model"])[:200] if isinstance(data.get("model"), str) else self.model,
                "latency_s": round(latency, 4),
                "attempts": attempts,
                "finish_reason": finish,
            }
            if k == 0:  # the request's tokens, counted once however many choices it returned
                response.meta["usage"] = usage
            if response.text is None and content and content.strip():
                response.meta["raw_text"] = content[:MAX_ANSWER_CHARS]
            out.append(response)
        return out

    def _check_answer(self, content: str | None, finish: str | None) -> Response:
        """An answer that is cut off, filtered or oversized is a failed sample, never an explanation."""
        if finish == "length":
            return Response(text=None, error=(
                f"truncated: finish_reason=length (raise max_new_tokens=, now {self.max_tokens})"))
        if finish == "content_filter":
            return Response(text=None, error="filtered: finish_reason=content_filter (the server withheld the answer)")
        if content is not None and len(content) > MAX_ANSWER_CHARS:
            return Response(text=None, error=(
                f"answer too long: {len(content)} characters (limit {MAX_ANSWER_CHARS}); not an explanation"))
        return clean_response(content)

    # -- helpers -----------------------------------------------------------------------------
    def _get_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout),
                    # no keep-alive: each request opens its own connection, so the watchdog knows
                    # which socket to end at the deadline (see _Watch)
                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0),
                    follow_redirects=False,
                )
            return self._client

    def _failed(self, error: str, attempts: int) -> Response:
        return Response(text=None, error=self.scrub(error), meta={"model": self.model, "attempts": attempts})

    def _error_detail(self, raw: bytes) -> tuple[str, str | None]:
        """The server's error message (scrubbed, one line, at most 300 characters) and its ``param``."""
        param = None
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return self._text_snippet(raw) if raw.strip() else "", None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            message = error.get("message", error)
            param = error.get("param") if isinstance(error.get("param"), str) else None
        elif error is not None:
            message = error
        elif isinstance(data, dict) and "message" in data:
            message = data["message"]
        else:
            message = data
        return self.scrub(" ".join(str(message).split()))[:300], param

    def _text_snippet(self, raw: bytes) -> str:
        text = " ".join(raw[:2000].decode("utf-8", "replace").split())
        return self.scrub(text)[:300] or "(empty body)"


class _Retry:
    """Why an attempt failed in a way worth retrying."""

    def __init__(self, error: str, retry_after: float | None = None, unreachable: bool = False) -> None:
        self.error, self.retry_after, self.unreachable = error, retry_after, unreachable


class _Oversized(Exception):
    pass


def _read_capped(reply: httpx.Response, deadline: float) -> bytes:
    """The (decompressed) body, refusing more than MAX_BODY_BYTES and stopping at ``deadline``."""
    declared = reply.headers.get("content-length")
    if declared and declared.strip().isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _Oversized(f"Content-Length {int(declared)}")
    chunks, size = [], 0
    for chunk in reply.iter_bytes():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _Oversized(f"more than {size} bytes")
        if time.monotonic() >= deadline:
            raise httpx.ReadTimeout("overall deadline passed while reading the body")
        chunks.append(chunk)
    return b"".join(chunks)


def _usage(raw: Any) -> dict[str, int | None]:
    """``prompt_tokens`` / ``completion_tokens`` of one request (None where the server gave none)."""
    raw = raw if isinstance(raw, dict) else {}

    def count(key: str) -> int | None:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    return {"prompt_tokens": count("prompt_tokens"), "completion_tokens": count("completion_tokens"), "requests": 1}


def _about_n(exc: _RequestFailed) -> bool:
    """True when a 400 names the ``n`` parameter (OpenAI's ``param``, or the word ``n`` in its message)."""
    return exc.param == "n" or bool(_ABOUT_N.search(exc.detail))


def _request_hint(detail: str) -> str:
    text = detail.lower()
    if "max_tokens" in text or "max_completion_tokens" in text or "token" in text:
        return "change max_new_tokens="
    if "model" in text:
        return "check the model name in backend='openai:MODEL'"
    if "temperature" in text:
        return "the temperature is not accepted by this server"
    if "image" in text:
        return "this model or server may not accept images"
    return "check backend='openai:MODEL', base_url= and max_new_tokens="
