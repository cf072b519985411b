"""ResponseCache and CachedBackend."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from latentexplainer_plugin.backends.base import Backend, BackendError
from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend
from latentexplainer_plugin.cache import CachedBackend, ResponseCache, default_cache_dir
from latentexplainer_plugin.types import Prompt, Response, Traversal

try:
    from tests.loopback_server import Fault, LoopbackServer, loopback  # noqa: F401
except ImportError:
    from loopback_server import Fault, LoopbackServer, loopback  # type: ignore  # noqa: F401


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cache-test")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def make_job(seed: int = 0) -> tuple[Traversal, Prompt]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 1, 2, 3, 32, 32, generator=g)
    traversal = Traversal(latent_id=f"z{seed}", images=images, strengths=torch.tensor([-1.0, 1.0]), rule="set", index=seed)
    pil = [Image.fromarray((images[0, 0, i].permute(1, 2, 0).numpy() * 255).astype("uint8")) for i in range(2)]
    return traversal, Prompt(text=f"What changes? {seed}", images=pil, bias="strip", system="sys")


def base_key(**overrides):
    _, prompt = make_job()
    args = dict(
        images=prompt.images, text="t", system="s", backend="openai", model="m",
        params={"temperature": 1.0, "max_tokens": 200}, index=0,
    )
    args.update(overrides)
    return ResponseCache.key(**args)


class CountingBackend(Backend):
    name = "counting"

    def __init__(self, fail_every: int = 0) -> None:
        self.requests: list[int] = []
        self.fail_every = fail_every
        self.model = "count-1"

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model, "temperature": 0.5}

    def explain(self, traversal, prompt, n):
        self.requests.append(n)
        out = []
        for i in range(n):
            k = len(self.requests) * 100 + i
            if self.fail_every and (i + 1) % self.fail_every == 0:
                out.append(Response(text=None, error="boom"))
            else:
                out.append(Response(text=f"answer {k}", meta={"k": k}))
        return out


# -- keys and storage ------------------------------------------------------------------------


def test_key_is_deterministic_and_sensitive():
    k = base_key()
    assert k == base_key() and len(k) == 64
    _, other = make_job(1)
    variants = [
        base_key(images=other.images),
        base_key(images=[]),
        base_key(text="t2"),
        base_key(system=None),
        base_key(backend="offline"),
        base_key(model="m2"),
        base_key(params={"temperature": 0.7, "max_tokens": 200}),
        base_key(index=1),
    ]
    assert len({k, *variants}) == len(variants) + 1
    # parameter order does not matter
    assert base_key(params={"max_tokens": 200, "temperature": 1.0}) == k
    # one changed pixel changes the key
    _, prompt = make_job()
    changed = [im.copy() for im in prompt.images]
    changed[0].putpixel((0, 0), (0, 0, 0) if changed[0].getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert base_key(images=changed) != k


def test_put_get_roundtrip_and_failures_never_stored(tmp_path):
    cache = ResponseCache(tmp_path)
    k1, k2, k3, k4 = (base_key(index=i) for i in range(4))
    assert cache.get(k1) is None
    assert cache.put(k1, Response(text="The circle grows.", meta={"model": "m", "attempts": 2}))
    assert cache.put(k2, Response(text="Nothing changes.", abstained=True))
    assert not cache.put(k3, Response(text=None, error="HTTP 500"))
    assert not cache.put(k4, Response(text="", error=None))
    got = cache.get(k1)
    assert got.text == "The circle grows." and got.ok and not got.abstained
    assert got.meta == {"model": "m", "attempts": 2, "cached": True}
    assert cache.get(k2).abstained is True
    assert cache.get(k3) is None and cache.get(k4) is None
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([f"{k1}.json", f"{k2}.json"])  # no temp files left behind
    assert (tmp_path / k1[:2] / f"{k1}.json").is_file()


def test_corrupt_entry_is_a_miss_and_gets_rewritten(tmp_path):
    cache = ResponseCache(tmp_path)
    k = base_key()
    cache.put(k, Response(text="a"))
    path = tmp_path / k[:2] / f"{k}.json"
    path.write_text("{not json")
    assert cache.get(k) is None
    cache.put(k, Response(text="b"))
    assert cache.get(k).text == "b"
    assert json.loads(path.read_text())["response"]["text"] == "b"


def test_disabled_cache_reads_and_writes_nothing(tmp_path):
    ResponseCache(tmp_path).put(base_key(), Response(text="stored"))
    cache = ResponseCache(tmp_path / "other", enabled=False)
    assert not cache.put(base_key(), Response(text="x"))
    assert not (tmp_path / "other").exists()
    assert ResponseCache(tmp_path, enabled=False).get(base_key()) is None


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ResponseCache().directory == tmp_path / "latentexplainer" / "responses"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "latentexplainer" / "responses"


def test_bad_key_rejected(tmp_path):
    with pytest.raises(ValueError):
        ResponseCache(tmp_path).get("../../etc/passwd")


# -- CachedBackend ---------------------------------------------------------------------------


def test_second_run_makes_zero_requests(loopback, tmp_path):
    loopback.answer = lambda req, i: f"The square moves ({req.ordinal}.{i})."
    jobs = [(*make_job(i), 3) for i in range(4)]
    with CachedBackend(OpenAICompatBackend(model="m", base_url=loopback.url), ResponseCache(tmp_path)) as backend:
        first = backend.explain_many(jobs)
    assert len(loopback.requests) == 4
    assert backend.stats() == {"hits": 0, "misses": 12, "calls": 4, "enabled": True, "write_failures": 0}

    with CachedBackend(OpenAICompatBackend(model="m", base_url=loopback.url), ResponseCache(tmp_path)) as backend2:
        second = backend2.explain_many(jobs)
        assert len(loopback.requests) == 4  # zero new requests
        assert (backend2.hits, backend2.misses, backend2.calls) == (12, 0, 0)
        assert [[r.text for r in job] for job in second] == [[r.text for r in job] for job in first]
        assert all(r.meta["cached"] for job in second for r in job)
        assert backend2.explain(*make_job(0), 3)[0].text == first[0][0].text
        assert len(loopback.requests) == 4

    # other sampling parameters or another model are different keys
    inner = OpenAICompatBackend(model="m", base_url=loopback.url, temperature=0.2)
    with CachedBackend(inner, ResponseCache(tmp_path)) as other:
        other.explain(*make_job(0), 1)
    assert len(loopback.requests) == 5


def test_only_missing_samples_are_requested(loopback, tmp_path):
    traversal, prompt = make_job()
    with CachedBackend(OpenAICompatBackend(model="m", base_url=loopback.url), ResponseCache(tmp_path)) as backend:
        backend.explain(traversal, prompt, 3)
        out = backend.explain(traversal, prompt, 5)
    assert len(out) == 5 and all(r.ok for r in out)
    assert [r.n for r in loopback.requests] == [3, 2]
    assert [bool(r.meta.get("cached")) for r in out] == [True, True, True, False, False]


def test_failures_are_not_cached(loopback, tmp_path):
    loopback.push(*[Fault.status(500)] * 2)
    inner = OpenAICompatBackend(model="m", base_url=loopback.url, max_retries=1, backoff_base=0.01, use_n=False, concurrency=1)
    traversal, prompt = make_job()
    with CachedBackend(inner, ResponseCache(tmp_path)) as backend:
        out = backend.explain(traversal, prompt, 2)
        assert sum(r.ok for r in out) == 1 and sum(not r.ok for r in out) == 1
        before = len(loopback.requests)
        again = backend.explain(traversal, prompt, 2)
    assert all(r.ok for r in again)
    assert len(loopback.requests) == before + 1  # only the failed sample is asked again
    assert loopback.requests[-1].n == 1


def test_no_cache_always_asks(tmp_path):
    inner = CountingBackend()
    backend = CachedBackend(inner, ResponseCache(tmp_path, enabled=False))
    traversal, prompt = make_job()
    backend.explain(traversal, prompt, 2)
    backend.explain(traversal, prompt, 2)
    assert inner.requests == [2, 2]
    assert not any(tmp_path.iterdir())
    assert backend.stats()["hits"] == 0 and backend.stats()["misses"] == 4


def test_partial_hits_keep_sample_order_and_failures(tmp_path):
    inner = CountingBackend(fail_every=2)
    backend = CachedBackend(inner, ResponseCache(tmp_path))
    traversal, prompt = make_job()
    first = backend.explain(traversal, prompt, 4)
    assert [r.ok for r in first] == [True, False, True, False]
    second = backend.explain(traversal, prompt, 4)
    assert inner.requests == [4, 2]  # only samples 1 and 3
    assert [r.text for r in second][0::2] == [first[0].text, first[2].text]
    assert second[1].text == "answer 200" and second[3].error == "boom"
    assert backend.name == "counting" and backend.describe()["model"] == "count-1"


def test_samples_from_bases_asks_for_all(tmp_path):
    class BasesBackend(CountingBackend):
        samples_from_bases = True

    inner = BasesBackend(fail_every=3)
    backend = CachedBackend(inner, ResponseCache(tmp_path))
    traversal, prompt = make_job()
    backend.explain(traversal, prompt, 3)
    backend.explain(traversal, prompt, 3)
    assert inner.requests == [3, 3]


def test_explain_many_keeps_job_errors(tmp_path):
    class Flaky(CountingBackend):
        def explain_many(self, jobs):
            return [BackendError("down") if p.text.endswith(" 1") else self.explain(t, p, n) for t, p, n in jobs]

    inner = Flaky()
    backend = CachedBackend(inner, ResponseCache(tmp_path))
    jobs = [(*make_job(i), 2) for i in range(3)]
    first = backend.explain_many(jobs)
    assert isinstance(first[1], BackendError) and len(first[0]) == 2 and len(first[2]) == 2
    second = backend.explain_many(jobs)
    assert inner.requests == [2, 2]  # jobs 0 and 2 cached; job 1 asked again (and failed again)
    assert isinstance(second[1], BackendError)
    assert [r.text for r in second[0]] == [r.text for r in first[0]]


# -- answers are stored as they arrive; a cache that cannot be written is only a warning ---------


def test_each_answer_is_stored_the_moment_it_arrives(loopback, tmp_path):
    import threading
    import time

    from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend as Backend_

    release = threading.Event()
    loopback.respond = lambda req: (release.wait(30), None)[1] if req.ordinal == 3 else None
    cache = ResponseCache(tmp_path)
    results: list = []
    with CachedBackend(Backend_(model="m", base_url=loopback.url, use_n=False, concurrency=1), cache) as backend:
        worker = threading.Thread(target=lambda: results.extend(backend.explain_many([(*make_job(0), 3)])))
        worker.start()
        try:
            deadline = time.monotonic() + 30
            while len(list(tmp_path.rglob("*.json"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)  # polling the files themselves: they are what is being tested
            stored_before_the_job_ended = len(list(tmp_path.rglob("*.json")))
            assert worker.is_alive()  # the third request is still held by the server
        finally:
            release.set()
            worker.join(30)
    assert stored_before_the_job_ended == 2
    assert len(results[0]) == 3 and all(r.ok for r in results[0])
    assert len(list(tmp_path.rglob("*.json"))) == 3


def test_a_file_in_the_way_is_a_warning_not_a_failed_latent(tmp_path):
    from latentexplainer_plugin.cache import CacheWriteWarning

    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    inner = CountingBackend()
    backend = CachedBackend(inner, ResponseCache(cache_dir))
    keys = backend._keys(make_job(0)[1], 2)
    (cache_dir / keys[0][:2]).write_text("not a folder")  # where the entry's folder should be
    with pytest.warns(CacheWriteWarning, match="cannot be written") as caught:
        out = backend.explain_many([(*make_job(0), 2)])
    assert [r.text for r in out[0]] == ["answer 100", "answer 101"]
    assert len([w for w in caught if issubclass(w.category, CacheWriteWarning)]) == 1  # once, not per answer
    assert backend.stats()["write_failures"] >= 1


def test_a_full_disk_is_a_warning(tmp_path, monkeypatch):
    import errno

    from latentexplainer_plugin.cache import CacheWriteWarning

    def full(self, path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ResponseCache, "_write", full)
    cache = ResponseCache(tmp_path)
    with pytest.warns(CacheWriteWarning, match="No space left on device"):
        assert cache.put(base_key(), Response(text="The square grows.")) is False
    assert cache.get(base_key()) is None and cache.write_failures == 1


def test_text_with_lone_surrogates_is_stored_and_read_back(tmp_path):
    cache = ResponseCache(tmp_path)
    text = "The square \ud83d grows."  # a lone surrogate, as a broken \\ud83d escape in JSON gives
    assert cache.put(base_key(), Response(text=text)) is True
    assert cache.get(base_key()).text == text
