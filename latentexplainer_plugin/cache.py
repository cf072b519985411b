"""A content-addressed on-disk cache of explainer responses, and a backend wrapper that uses it.

A key is the sha256 over everything that decides an answer: the prompt images (their pixels),
the prompt text, the system text, the backend name, the model, the sampling parameters and the
sample index. Sample ``i`` of a prompt is cached on its own, so asking for ``n=5`` after ``n=3``
only asks the backend for two new samples.

Only successful, non-empty responses are stored; failures never are, so a rerun retries them.
Each value is a small JSON file ``<dir>/<key[:2]>/<key>.json`` written atomically (temp file in
the same folder, then ``os.replace``), so parallel runs and interrupted runs never leave a half
written entry. An unreadable entry is treated as a miss.

Default directory: ``$XDG_CACHE_HOME/latentexplainer/responses``, or
``~/.cache/latentexplainer/responses`` when ``XDG_CACHE_HOME`` is unset. ``--no-cache`` maps to
``ResponseCache(enabled=False)``: nothing is read or written.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

from . import safe_io
from .backends.base import Backend
from .types import Prompt, Response, Traversal

__all__ = ["ResponseCache", "CachedBackend", "CacheWriteWarning", "default_cache_dir"]

log = logging.getLogger(__name__)


class CacheWriteWarning(UserWarning):
    """An answer could not be stored in the response cache (the run goes on without it)."""

_FORMAT = 1  # bump to invalidate every stored entry
_OPERATIONAL = {"name", "model", "timeout", "max_retries", "concurrency", "use_n", "backoff_base", "backoff_max", "api_key_env"}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "latentexplainer" / "responses"


def _image_digest(image: Any) -> bytes:
    """A stable digest of one prompt image: mode, size and raw pixels (PNG bytes hashed as given)."""
    if isinstance(image, (bytes, bytearray)):
        return hashlib.sha256(b"bytes:" + bytes(image)).digest()
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):
        h = hashlib.sha256(f"pil:{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
        h.update(image.tobytes())
        return h.digest()
    raise TypeError(f"cannot hash a prompt image of type {type(image).__name__}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


class ResponseCache:
    """Content-addressed storage of successful :class:`Response` objects."""

    def __init__(self, directory: Path | str | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.write_failures = 0  # answers that could not be stored (see put)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.directory)!r}, enabled={self.enabled})"

    @staticmethod
    def key(
        images: Iterable[Any],
        text: str,
        system: str | None,
        backend: str,
        model: str | None,
        params: dict | None,
        index: int,
    ) -> str:
        """The hex sha256 that names one sample of one prompt."""
        h = hashlib.sha256()
        header = {
            "format": _FORMAT,
            "text": text,
            "system": system,
            "backend": backend,
            "model": model,
            "params": _jsonable(params or {}),
            "index": int(index),
        }
        h.update(json.dumps(header, sort_keys=True, ensure_ascii=True).encode())
        for image in images:
            h.update(_image_digest(image))
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        if len(key) < 3 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are lowercase hex digests, got {key!r}")
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> Response | None:
        if not self.enabled:
            return None
        path = self._path(key)
        try:
            data = json.loads(safe_io.read_text(path))  # a link or FIFO planted here is a miss, never followed
            if data.get("format") != _FORMAT:
                return None
            stored = data["response"]
            if not isinstance(stored.get("text"), str) or not stored["text"]:
                return None
            meta = dict(stored.get("meta") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        meta["cached"] = True
        return Response(text=stored["text"], error=None, abstained=bool(stored.get("abstained")), meta=meta)

    def put(self, key: str, response: Response) -> bool:
        """Store ``response`` when it is a successful, non-empty answer; True when it was written.

        A cache that cannot be written (disk full, a file in the way, no permission) costs only the
        reuse: a :class:`CacheWriteWarning` (once per cache) and False, never an exception.
        """
        if not self.enabled or not response.ok or not (response.text or "").strip():
            return False
        path = self._path(key)
        meta = {k: v for k, v in (response.meta or {}).items() if k != "cached"}
        record = {
            "format": _FORMAT,
            "key": key,
            "response": {"text": response.text, "abstained": bool(response.abstained), "meta": _jsonable(meta)},
        }
        # ensure_ascii: any text can be stored, even lone surrogates from a broken \ud83d escape
        text = json.dumps(record, ensure_ascii=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write(path, text)
        except (OSError, ValueError) as exc:
            self._write_failed(path, exc)
            return False
        return True

    def _write(self, path: Path, text: str) -> None:
        """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename), following
        no link: a link or special file at the entry or its folder raises ``safe_io.UnsafePathError``
        (an OSError) and is left untouched; the temp file is removed on any failure."""
        safe_io.ensure_dir(path.parent)
        safe_io.atomic_write_text(path, text)

    def _write_failed(self, path: Path, exc: Exception) -> None:
        with self._lock:
            self.write_failures += 1
            first = self.write_failures == 1
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if first:
            warnings.warn(
                f"the response cache cannot be written ({reason}: {path}); answers are used but not stored, "
                f"so a rerun asks for them again. Fix or free {self.directory}, or pass cache_dir=DIR / no_cache=True",
                CacheWriteWarning,
                stacklevel=3,
            )
        else:
            log.debug("cache write failed again (%s: %s)", reason, path)


class CachedBackend(Backend):
    """Wraps a backend: serves samples from a :class:`ResponseCache`, asks the backend for the rest.

    For each job it looks up the per-sample keys ``0..n-1`` and calls the inner backend only for
    the missing count. ``hits`` / ``misses`` count samples, ``calls`` counts jobs forwarded to
    the inner backend. A backend whose samples come from different base latents
    (``samples_from_bases``) is asked for all ``n`` whenever any sample is missing, because its
    i-th answer belongs to the i-th base.
    """

    def __init__(self, backend: Backend, cache: ResponseCache) -> None:
        self.backend = backend
        self.cache = cache
        # mirror the inner backend's capabilities (class attributes on Backend)
        self.name = backend.name  # type: ignore[misc]
        self.supports_images = backend.supports_images  # type: ignore[misc]
        self.supports_n = backend.supports_n  # type: ignore[misc]
        self.needs_key = backend.needs_key  # type: ignore[misc]
        self.samples_from_bases = backend.samples_from_bases  # type: ignore[misc]
        self.hits = 0
        self.misses = 0
        self.calls = 0
        self._lock = threading.Lock()

    def describe(self) -> dict:
        return self.backend.describe()

    def close(self) -> None:
        """Close the inner backend when it holds resources (an HTTP client)."""
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> "CachedBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "calls": self.calls, "enabled": self.cache.enabled,
                "write_failures": self.cache.write_failures}

    def _params(self) -> tuple[str | None, dict]:
        described = self.backend.describe()
        sampling = getattr(self.backend, "sampling_params", None)
        params = sampling() if callable(sampling) else {k: v for k, v in described.items() if k not in _OPERATIONAL}
        model = described.get("model", getattr(self.backend, "model", None))
        return (str(model) if model is not None else None), params

    def _keys(self, prompt: Prompt, n: int) -> list[str]:
        model, params = self._params()
        return [
            self.cache.key(prompt.images, prompt.text, prompt.system, self.backend.name, model, params, i)
            for i in range(n)
        ]

    def _plan(self, prompt: Prompt, n: int) -> tuple[list[str], list[Response | None], list[int]]:
        keys = self._keys(prompt, n) if self.cache.enabled else []
        found: list[Response | None] = [self.cache.get(k) for k in keys] if keys else [None] * n
        missing = [i for i, r in enumerate(found) if r is None]
        if missing and self.backend.samples_from_bases:
            found, missing = [None] * n, list(range(n))
        with self._lock:
            self.hits += n - len(missing)
            self.misses += len(missing)
            if missing:
                self.calls += 1
        return keys, found, missing

    def _merge(self, keys: list[str], found: list[Response | None], missing: list[int], fresh: list[Response],
               stored: set[int] | None = None) -> list[Response]:
        if len(fresh) != len(missing):
            raise RuntimeError(
                f"{type(self.backend).__name__} returned {len(fresh)} responses for {len(missing)} requested samples"
            )
        out = list(found)
        for k, (i, response) in enumerate(zip(missing, fresh)):
            out[i] = response
            if keys and (stored is None or k not in stored):
                self.cache.put(keys[i], response)
        return out  # type: ignore[return-value]

    def explain(self, traversal: Traversal, prompt: Prompt, n: int) -> list[Response]:
        keys, found, missing = self._plan(prompt, n)
        if not missing:
            return found  # type: ignore[return-value]
        fresh = self.backend.explain(traversal, prompt, len(missing))
        return self._merge(keys, found, missing, fresh)

    def _streams_answers(self) -> bool:
        """True when the inner backend's ``explain_many`` reports each answer as it arrives."""
        try:
            return "on_response" in inspect.signature(self.backend.explain_many).parameters
        except (TypeError, ValueError):
            return False

    def explain_many(
        self,
        jobs: list[tuple[Traversal, Prompt, int]],
        on_response: Callable[[int, int, Response], None] | None = None,
    ) -> list[list[Response] | BaseException]:
        """Serve what the cache has; ask the inner backend for the rest, storing each answer the
        moment it arrives (so an interrupted round loses no answer that was paid for)."""
        results: list[list[Response] | BaseException | None] = [None] * len(jobs)
        plans = []
        forward: list[tuple[Traversal, Prompt, int]] = []
        for j, (traversal, prompt, n) in enumerate(jobs):
            try:
                keys, found, missing = self._plan(prompt, n)
            except Exception as exc:  # e.g. an unhashable image: this job only
                results[j] = exc
                continue
            if missing:
                plans.append((j, keys, found, missing))
                forward.append((traversal, prompt, len(missing)))
            else:
                results[j] = found  # type: ignore[assignment]
            if on_response is not None:
                for i, response in enumerate(found):
                    if response is not None:
                        on_response(j, i, response)
        if forward:
            stored: list[set[int]] = [set() for _ in plans]

            def arrived(f: int, k: int, response: Response) -> None:
                j, keys, _, missing = plans[f]
                if keys and 0 <= k < len(missing):
                    self.cache.put(keys[missing[k]], response)
                    stored[f].add(k)
                if on_response is not None and 0 <= k < len(missing):
                    on_response(j, missing[k], response)

            if self._streams_answers():
                answers = self.backend.explain_many(forward, on_response=arrived)
            else:
                answers = self.backend.explain_many(forward)
            for f, ((j, keys, found, missing), answer) in enumerate(zip(plans, answers)):
                if isinstance(answer, BaseException):
                    results[j] = answer
                    continue
                try:
                    results[j] = self._merge(keys, found, missing, answer, stored[f])
                except Exception as exc:
                    results[j] = exc
        return results  # type: ignore[return-value]
