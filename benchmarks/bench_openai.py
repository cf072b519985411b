"""Wall time of the OpenAI-compatible backend: concurrent vs sequential requests, then a cached rerun.

A loopback chat-completions server (tests/loopback_server.py) answers every request after
``--delay`` seconds (default 200 ms). The backend explains ``--latents`` traversals with
``--samples`` answers each (real prompts from the disentanglement bias, one traversal grid image
each), first with ``--concurrency`` requests in flight, then with one (sequential), for two kinds
of server:

* ``n`` honoured: one request per latent returns all samples (OpenAI, vLLM);
* ``n`` ignored: the backend sends one request per sample (many local servers).

It prints both times and their ratio (goal: concurrent <= 1/5 of sequential), then runs the same
jobs through the response cache twice and prints how many requests the second pass made (goal: 0).

    python benchmarks/bench_openai.py [--latents 10] [--samples 5] [--concurrency 8] [--delay 0.2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from loopback_server import LoopbackServer  # noqa: E402

from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend  # noqa: E402
from latentexplainer_plugin.biases import DISENTANGLEMENT, build_prompt  # noqa: E402
from latentexplainer_plugin.cache import CachedBackend, ResponseCache  # noqa: E402
from latentexplainer_plugin.types import Traversal  # noqa: E402

KEY_ENV = "LATENTEXPLAINER_BENCH_KEY"


def make_jobs(latents: int, samples: int) -> list:
    g = torch.Generator().manual_seed(0)
    jobs = []
    for i in range(latents):
        images = torch.rand(1, 2, 5, 3, 32, 32, generator=g)
        traversal = Traversal(f"z{i}", images, torch.linspace(-3, 3, 5), "set", index=i,
                              row_labels=["z9=-2", "z9=+2"], meta={"clamped": 9})
        jobs.append((traversal, build_prompt(DISENTANGLEMENT, traversal), samples))
    return jobs


def timed(backend, jobs) -> float:
    t0 = time.perf_counter()
    answers = backend.explain_many(jobs)
    elapsed = time.perf_counter() - t0
    bad = [a for a in answers if isinstance(a, BaseException) or not all(r.ok for r in a)]
    if bad:
        raise SystemExit(f"benchmark run had failures: {bad[:2]}")
    return elapsed


def backend_for(server: LoopbackServer, concurrency: int) -> OpenAICompatBackend:
    return OpenAICompatBackend(model="bench", base_url=server.url, api_key_env=KEY_ENV, timeout=30,
                               concurrency=concurrency, max_retries=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latents", type=int, default=10)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--delay", type=float, default=0.2)
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "bench-key")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(var, None)
    jobs = make_jobs(args.latents, args.samples)
    print(f"{args.latents} latents x {args.samples} samples, server delay {args.delay * 1000:.0f} ms per request")

    for label, supports_n in (("n honoured", True), ("n ignored", False)):
        with LoopbackServer(answer="The object moves left to right.", delay=args.delay, supports_n=supports_n) as server:
            with backend_for(server, args.concurrency) as backend:
                timed(backend, jobs[:1])  # warm-up: connection, and (n ignored) learning that n is not honoured
                server.reset()
                concurrent = timed(backend, jobs)
                n_concurrent, in_flight = len(server.chat_requests), server.max_in_flight
            server.reset()
            with backend_for(server, 1) as backend:
                timed(backend, jobs[:1])
                server.reset()
                sequential = timed(backend, jobs)
                n_sequential = len(server.chat_requests)
        ratio = concurrent / sequential
        print(f"[{label}] concurrency {args.concurrency}: {concurrent:.2f} s ({n_concurrent} requests, "
              f"at most {in_flight} in flight) | concurrency 1: {sequential:.2f} s "
              f"({n_sequential} requests) | ratio {ratio:.3f} (goal <= 0.200: {'met' if ratio <= 0.2 else 'NOT met'})")

    with LoopbackServer(answer="The object moves left to right.", delay=args.delay) as server, \
            tempfile.TemporaryDirectory() as cache_dir:
        cache = ResponseCache(cache_dir)
        with CachedBackend(backend_for(server, args.concurrency), cache) as cached:
            first = timed(cached, jobs)
            asked = len(server.chat_requests)
        with CachedBackend(backend_for(server, args.concurrency), cache) as cached:
            second = timed(cached, jobs)
            again = len(server.chat_requests) - asked
            stats = cached.stats()
        print(f"[cache] first run {first:.2f} s, {asked} requests | rerun {second:.3f} s, {again} requests "
              f"({stats['hits']} samples from the cache)")


if __name__ == "__main__":
    main()
