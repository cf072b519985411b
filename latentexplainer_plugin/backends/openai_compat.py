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
(server error text is scrubbed of it before it is used).
"""

from __future__ import annotations

import base64
import email.utils
import io
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..types import Prompt, Response, Traversal
from .base import Backend, BackendError
from .responses import clean_response

__all__ = ["OpenAICompatBackend", "image_data_url"]

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


class _RequestFailed(Exception):
    """A request that produced no usable body: retries exhausted or a non-retryable 4xx."""

    def __init__(self, message: str, attempts: int, status: int | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.status = status


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


class OpenAICompatBackend(Backend):
    """Explains a traversal by asking an OpenAI-compatible chat model ``n`` times.

    Args:
        model: model name sent in every request.
        base_url: API root (``.../v1``); ``/chat/completions`` is appended unless already there.
        api_key_env: environment variable that holds the key (read once, here).
        timeout: seconds per HTTP request (connect, write, read each).
        max_retries: retries after the first attempt for 429/5xx/timeouts/connection errors/
            malformed bodies.
        concurrency: most requests in flight at once, over all jobs of :meth:`explain_many`.
        temperature, max_tokens: sampling parameters sent to the server.
        use_n: True: always one request with ``n``; False: always n single requests; None: try
            ``n`` and fall back (for this and later calls) when the server returns fewer choices
            or rejects ``n``.
        backoff_base, backoff_max: full-jitter backoff, attempt k waits
            ``uniform(0, min(backoff_max, backoff_base * 2**k))``; ``Retry-After`` wins when
            present (capped by ``backoff_max``).
    """

    name = "openai"
    supports_images = True
    supports_n = True
    needs_key = True

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
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError(f"backoff_base and backoff_max must be >= 0, got {backoff_base!r}, {backoff_max!r}")
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise BackendError(
                f"No API key: set the {api_key_env} environment variable "
                "(or choose another variable with --api-key-env NAME)"
            )
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url if self.base_url.endswith("/chat/completions") else self.base_url + "/chat/completions"
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.use_n = use_n
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self._secret = key
        self._headers = {"Authorization": f"Bearer {key}"}
        self._n_works: bool | None = use_n  # learned when use_n is None
        self._token_field = "max_tokens"
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self._client: httpx.Client | None = None

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

    def explain(self, traversal: Traversal, prompt: Prompt, n: int) -> list[Response]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        messages = self._messages(prompt)
        use_n = self.use_n if self.use_n is not None else self._n_works
        if n == 1 or use_n is False:
            return self._singles(messages, n)

        try:
            got = self._request(messages, n)
        except _RequestFailed as exc:
            if self.use_n is None and exc.status in (400, 422):
                log.info("server rejected n=%d (%s); using %d single requests", n, exc, n)
                self._n_works = False
                return self._singles(messages, n)
            return [self._failed(str(exc), exc.attempts) for _ in range(n)]
        if len(got) >= n:
            if self.use_n is None:
                self._n_works = True
            return got[:n]
        if self.use_n is True:
            missing = n - len(got)
            return got + [self._failed(f"server returned {len(got)} of {n} choices", 1) for _ in range(missing)]
        log.info("server returned %d of %d choices; asking for the rest one by one", len(got), n)
        self._n_works = False
        return got + self._singles(messages, n - len(got))

    def explain_many(self, jobs: list[tuple[Traversal, Prompt, int]]) -> list[list[Response] | BaseException]:
        if not jobs:
            return []

        def run(job: tuple[Traversal, Prompt, int]) -> list[Response] | BaseException:
            traversal, prompt, n = job
            try:
                return self.explain(traversal, prompt, n)
            except Exception as exc:  # one job failing never loses the others
                return exc

        if len(jobs) == 1:
            return [run(jobs[0])]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)), thread_name_prefix="explain") as pool:
            return list(pool.map(run, jobs))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __enter__(self) -> "OpenAICompatBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _singles(self, messages: list[dict], count: int) -> list[Response]:
        """``count`` one-choice requests, run in parallel (the semaphore bounds what is in flight)."""

        def one(_: int) -> Response:
            try:
                got = self._request(messages, 1)
            except _RequestFailed as exc:
                return self._failed(str(exc), exc.attempts)
            return got[0] if got else self._failed("server returned no choices", 1)

        if count == 1:
            return [one(0)]
        with ThreadPoolExecutor(max_workers=min(count, self.concurrency), thread_name_prefix="sample") as pool:
            return list(pool.map(one, range(count)))  # re-raises a BackendError from any sample

    def _request(self, messages: list[dict], n: int) -> list[Response]:
        """One chat-completions call (with retries); its choices as cleaned Responses."""
        try:
            data, attempts, latency = self._post(self._body(messages, n))
        except _RequestFailed as exc:
            if (
                exc.status == 400
                and self._token_field == "max_tokens"
                and "max_completion_tokens" in str(exc)
            ):  # newer OpenAI models renamed the parameter
                self._token_field = "max_completion_tokens"
                data, attempts, latency = self._post(self._body(messages, n))
            else:
                raise
        return self._responses(data, attempts, latency)

    def _post(self, body: dict) -> tuple[dict, int, float]:
        client = self._get_client()
        attempts = 0
        last_error = "no attempt made"
        unreachable = False
        for attempt in range(self.max_retries + 1):
            attempts += 1
            retry_after: float | None = None
            started = time.monotonic()
            try:
                with self._slots:
                    reply = client.post(self.url, json=body, headers=self._headers)
            except httpx.TimeoutException as exc:
                last_error = f"request timed out after {self.timeout:g} s ({type(exc).__name__})"
                unreachable = False
            except httpx.TransportError as exc:
                last_error = self._scrub(f"connection error at {self.url}: {type(exc).__name__}: {exc}")
                unreachable = isinstance(exc, httpx.ConnectError)
            else:
                unreachable = False
                latency = time.monotonic() - started
                status = reply.status_code
                if status in (401, 403):
                    raise BackendError(
                        f"authentication failed (HTTP {status}) at {self.url}: check the key in ${self.api_key_env}"
                    )
                if status == 404:
                    raise BackendError(
                        f"HTTP 404 at {self.url}: check the base URL and the model name {self.model!r}"
                        f" ({self._snippet(reply)})"
                    )
                if status in _RETRY_STATUS or status >= 500:
                    last_error = f"HTTP {status} from {self.url}: {self._snippet(reply)}"
                    retry_after = _parse_retry_after(reply.headers)
                elif status >= 400:
                    raise _RequestFailed(f"HTTP {status} from {self.url}: {self._snippet(reply)}", attempts, status)
                else:
                    try:
                        data = reply.json()
                    except ValueError:
                        last_error = f"malformed JSON from {self.url}: {self._snippet(reply)}"
                    else:
                        choices = data.get("choices") if isinstance(data, dict) else None
                        if isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
                            return data, attempts, latency
                        detail = data.get("error") if isinstance(data, dict) else None
                        last_error = self._scrub(
                            f"response from {self.url} has no choices" + (f": {detail}" if detail else "")
                        )[:500]
            if attempt < self.max_retries:
                delay = self._backoff(attempt, retry_after)
                log.debug("attempt %d failed (%s); retrying in %.2f s", attempts, last_error, delay)
                time.sleep(delay)
        if unreachable:
            raise BackendError(f"cannot reach {self.url} after {attempts} attempts: {last_error}")
        raise _RequestFailed(f"{last_error} (gave up after {attempts} attempts)", attempts)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.backoff_max, retry_after)
        with self._lock:
            return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * (2**attempt)))

    def _responses(self, data: dict, attempts: int, latency: float) -> list[Response]:
        choices = sorted(
            data["choices"], key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0
        )
        out = []
        for choice in choices:
            message = choice.get("message") or {}
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # some servers answer with content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            elif content is not None and not isinstance(content, str):
                content = str(content)
            response = clean_response(content)
            if response.text is None and isinstance(message, dict) and message.get("refusal"):
                response.error = self._scrub(f"refused: {message['refusal']}")[:500]
            response.meta = {
                "model": data.get("model") or self.model,
                "latency_s": round(latency, 4),
                "attempts": attempts,
                "finish_reason": choice.get("finish_reason"),
            }
            out.append(response)
        return out

    # -- helpers -----------------------------------------------------------------------------
    def _get_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(
                        max_connections=self.concurrency, max_keepalive_connections=self.concurrency
                    ),
                    follow_redirects=False,
                )
            return self._client

    def _failed(self, error: str, attempts: int) -> Response:
        return Response(text=None, error=self._scrub(error), meta={"model": self.model, "attempts": attempts})

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _snippet(self, reply: httpx.Response) -> str:
        try:
            data = reply.json()
            message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error") or data
        except Exception:
            message = reply.text
        text = " ".join(str(message).split())
        return self._scrub(text)[:300] or "(empty body)"
