"""A programmable OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

Usage::

    with LoopbackServer(answer="The circle grows.") as server:
        backend = OpenAICompatBackend(model="m", base_url=server.url)
        ...
        assert len(server.requests) == 1

or through the :func:`loopback` pytest fixture (import it into a test module)::

    from loopback_server import loopback  # noqa: F401  (registers the fixture)

    def test_x(loopback):
        loopback.answer = "..."

What it can do (all attributes may be changed while it runs):

* ``answer``: a string, or a function ``(request: RecordedRequest, choice_index: int) -> str | None``
  (``None`` gives ``content: null``);
* ``respond``: a function ``(request) -> Reply | None`` that takes over a request completely
  (``None`` falls through to the normal behaviour);
* ``supports_n``: when False, ``n`` is ignored and one choice comes back; ``reject_n``: when True a
  request with ``n > 1`` gets HTTP 400;
* ``require_key``: a key the ``Authorization: Bearer`` header must carry, otherwise HTTP 401;
* ``delay``: seconds to wait before every answer;
* ``push(*faults)``: scripted faults used by the next requests, one per request, in order
  (:meth:`Fault.status` (e.g. 429 with Retry-After, 500, 401), :meth:`Fault.slow`,
  :meth:`Fault.malformed`, :meth:`Fault.empty`, :meth:`Fault.no_choices`, :meth:`Fault.drop`,
  :meth:`Fault.trickle` (a byte per second, optionally in the headers), :meth:`Fault.oversized`
  (a huge body or a gzip bomb), :meth:`Fault.choices` (given contents, finish reasons and usage));
* a deterministic schedule: ``fail_every=k`` (every k-th request gets HTTP 500), or
  ``fail_rate`` / ``slow_rate`` / ``slow_delay`` with ``seed`` — drawn from ``Random(seed, ordinal)``
  so request number ``i`` always gets the same fate whatever the thread timing.

It records every request (:class:`RecordedRequest`: ordinal, path, headers, JSON body, time) in
``requests`` and the largest number of requests it was handling at once in ``max_in_flight``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

__all__ = ["Fault", "LoopbackServer", "RecordedRequest", "Reply", "loopback"]


@dataclass
class RecordedRequest:
    ordinal: int  # 1-based arrival order
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when it was not JSON
    time: float

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1) or 1) if isinstance(self.body, dict) else 1

    def text_parts(self) -> list[str]:
        return [p["text"] for p in self._user_parts() if p.get("type") == "text"]

    def image_urls(self) -> list[str]:
        return [p["image_url"]["url"] for p in self._user_parts() if p.get("type") == "image_url"]

    def _user_parts(self) -> list[dict]:
        parts: list[dict] = []
        for message in self.body.get("messages", []):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    parts.append({"type": "text", "text": content})
                else:
                    parts.extend(content)
        return parts


@dataclass
class Reply:
    """A complete HTTP answer; ``drop=True`` closes the connection without answering.

    ``trickle`` > 0 sends the body one byte per ``trickle`` seconds (after the headers, or, with
    ``trickle_headers``, the header block too), like a server that never quite stops talking.
    """

    status: int = 200
    body: bytes | str | dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    trickle: float = 0.0
    trickle_headers: bool = False


class Fault:
    """Scripted faults for :meth:`LoopbackServer.push`."""

    @staticmethod
    def status(code: int, retry_after: float | str | None = None, message: str = "injected error") -> Reply:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return Reply(code, {"error": {"message": message, "type": "injected", "code": code}}, headers)

    @staticmethod
    def slow(seconds: float) -> str | tuple:
        return ("slow", seconds)

    @staticmethod
    def malformed() -> Reply:
        return Reply(200, b'{"choices": [ {"message": ', {"Content-Type": "application/json"})

    @staticmethod
    def no_choices() -> Reply:
        return Reply(200, {"id": "x", "object": "chat.completion"})

    @staticmethod
    def empty() -> tuple:
        return ("empty",)

    @staticmethod
    def drop() -> Reply:
        return Reply(drop=True)

    @staticmethod
    def trickle(seconds: float = 30.0, interval: float = 1.0, headers: bool = False) -> Reply:
        """A valid answer sent one byte per ``interval`` seconds for about ``seconds`` seconds."""
        body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                        "finish_reason": "stop"}]})
        count = max(1, int(seconds / interval))
        body = body + " " * max(0, count - len(body)) if not headers else body
        return Reply(200, body, trickle=interval, trickle_headers=headers)

    @staticmethod
    def oversized(size: int = 6 * 1024 * 1024, gzip_bomb: bool = False) -> Reply:
        """A body of ``size`` bytes (``gzip_bomb``: that many zero bytes, gzip-compressed to a few KB)."""
        if gzip_bomb:
            import gzip

            return Reply(200, gzip.compress(b" " * size), {"Content-Encoding": "gzip", "Content-Type": "application/json"})
        return Reply(200, b'{"choices": [' + b" " * size + b"]}")

    @staticmethod
    def choices(*items: tuple[str | None, str | None], usage: dict | None = None) -> Reply:
        """A 200 answer with the given (content, finish_reason) choices and ``usage``."""
        body: dict[str, Any] = {"id": "x", "object": "chat.completion", "model": "loopback", "choices": [
            {"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": f}
            for i, (c, f) in enumerate(items)]}
        if usage is not None:
            body["usage"] = usage
        return Reply(200, body)


class LoopbackServer:
    def __init__(
        self,
        answer: str | Callable[[RecordedRequest, int], str | None] = "The shape moves to the right.",
        *,
        supports_n: bool = True,
        reject_n: bool = False,
        require_key: str | None = None,
        delay: float = 0.0,
        respond: Callable[[RecordedRequest], Reply | None] | None = None,
        fail_every: int | None = None,
        fail_rate: float = 0.0,
        slow_rate: float = 0.0,
        slow_delay: float = 0.1,
        seed: int = 0,
        port: int = 0,
    ) -> None:
        self.answer = answer
        self.supports_n = supports_n
        self.reject_n = reject_n
        self.require_key = require_key
        self.delay = delay
        self.respond = respond
        self.fail_every = fail_every
        self.fail_rate = fail_rate
        self.slow_rate = slow_rate
        self.slow_delay = slow_delay
        self.seed = seed
        self.bind_port = port  # 0: any free port
        self.prompt_tokens = 50  # usage of every normal answer: 50 per request, 7 per choice
        self.completion_tokens = 7
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: list[Any] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "LoopbackServer":
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.bind_port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL to give a client (ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- programming -------------------------------------------------------------------------
    def push(self, *faults: Any) -> None:
        """Queue faults for the next requests, one per request, in order."""
        with self._lock:
            self._faults.extend(faults)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self.max_in_flight = 0

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- handling (called from handler threads) ------------------------------------------------
    def _record(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[RecordedRequest, Any]:
        try:
            body: Any = json.loads(raw.decode("utf-8")) if raw else {}
        except (ValueError, UnicodeDecodeError):
            body = raw.decode("utf-8", "replace")
        with self._lock:
            request = RecordedRequest(len(self.requests) + 1, method, path, headers, body, time.monotonic())
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self._faults.pop(0) if self._faults else None
        return request, fault

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _decide(self, request: RecordedRequest, fault: Any) -> Reply:
        if isinstance(fault, Reply):
            return fault
        extra_delay = 0.0
        empty = False
        if isinstance(fault, tuple) and fault and fault[0] == "slow":
            extra_delay = float(fault[1])
        elif isinstance(fault, tuple) and fault and fault[0] == "empty":
            empty = True

        if self.respond is not None:
            reply = self.respond(request)
            if reply is not None:
                return reply
        if self.require_key is not None:
            if request.headers.get("authorization") != f"Bearer {self.require_key}":
                return Fault.status(401, message="Incorrect API key provided")
        if not request.path.endswith("/chat/completions") or request.method != "POST":
            return Reply(404, {"error": {"message": f"no route {request.method} {request.path}"}})
        if not isinstance(request.body, dict) or "messages" not in request.body:
            return Reply(400, {"error": {"message": "body must be JSON with messages"}})
        if fault is None:
            if self.fail_every and request.ordinal % self.fail_every == 0:
                return Fault.status(500, message="scheduled failure")
            rng = random.Random(f"{self.seed}:{request.ordinal}")
            if rng.random() < self.fail_rate:
                return Fault.status(500, message="random failure")
            if rng.random() < self.slow_rate:
                extra_delay = self.slow_delay
        n = request.n
        if n > 1 and self.reject_n:
            return Reply(400, {"error": {"message": "n > 1 is not supported", "param": "n"}})
        count = n if self.supports_n else 1
        choices = []
        for i in range(count):
            if empty:
                content: str | None = ""
            elif callable(self.answer):
                content = self.answer(request, i)
            else:
                content = self.answer
            choices.append(
                {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            )
        body = {
            "id": f"chatcmpl-{request.ordinal}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.body.get("model", "loopback"),
            "choices": choices,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens * count,
                      "total_tokens": self.prompt_tokens + self.completion_tokens * count},
        }
        return Reply(200, body, delay=self.delay + extra_delay)


class _Handler(BaseHTTPRequestHandler):
    owner: LoopbackServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end by themselves

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        request, fault = self.owner._record(self.command, self.path, headers, raw)
        try:
            reply = self.owner._decide(request, fault)
            if reply.delay:
                time.sleep(reply.delay)
            if reply.drop:
                self.close_connection = True
                return
            body = reply.body
            if isinstance(body, dict) or (body is None and reply.status >= 400):
                data = json.dumps(body or {"error": {"message": "error"}}).encode()
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = body or b""
            if reply.trickle:
                self._trickle(reply, data)
                return
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.headers.get("Content-Type", "application/json"))
            for key, value in reply.headers.items():
                if key.lower() != "content-type":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True
        finally:
            self.owner._done()

    def _trickle(self, reply: Reply, data: bytes) -> None:
        head = (f"HTTP/1.1 {reply.status} OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nX-Padding: {'p' * 40}\r\n\r\n").encode()
        self.close_connection = True
        if not reply.trickle_headers:
            self.wfile.write(head)
            self.wfile.flush()
            head = b""
        for i in range(len(head + data)):
            time.sleep(reply.trickle)
            self.wfile.write((head + data)[i:i + 1])
            self.wfile.flush()

    do_POST = _handle
    do_GET = _handle

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            pass


try:  # the fixture is optional so the module also works without pytest
    import pytest

    @pytest.fixture
    def loopback() -> Iterator[LoopbackServer]:
        """A started :class:`LoopbackServer`, stopped at teardown."""
        with LoopbackServer() as server:
            yield server

except ImportError:  # pragma: no cover
    pass
