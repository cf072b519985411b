"""Throughput of the openai: backend against a real vLLM server: n in one request vs n single requests,
concurrency 1 vs 8, measured in one run against one server.

Start the server with ``bash benchmarks/check_vllm.sh --bench-only`` (it builds the tiny LLaVA, starts
vLLM, runs this script and stops the server), or point it at a server you run yourself:

    python benchmarks/bench_vllm.py --base-url http://127.0.0.1:8000/v1 --model NAME \
        [--api-key-env VAR] [--latents 32] [--repeats 2] [--samples 5] [--max-tokens 48] [--server-log FILE]

Each of the four settings explains the same ``--latents`` jobs (real disentanglement prompts, one
traversal grid image each) with ``--samples`` answers, through :class:`OpenAICompatBackend` without
the response cache: ``use_n=True`` (one request with ``n`` per latent) or ``use_n=False`` (n
one-choice requests per latent), each with 1 and 8 requests in flight. One latent is explained first
(not timed) to open the connection; the fastest of ``--repeats`` passes counts (the machine may be
shared). Prints latents per minute, requests per pass (from the server's access log when
``--server-log`` is given), completion tokens of the last pass, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

from latentexplainer_plugin.backends.openai_compat import OpenAICompatBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_openai import make_jobs  # noqa: E402 (the same seeded jobs as the loopback benchmark)

_ACCESS = re.compile(r'"POST /v1/chat/completions HTTP/[0-9.]+" (\d{3})')


def logged_requests(log: Path | None) -> int | None:
    if log is None:
        return None
    return len(_ACCESS.findall(log.read_text(errors="replace")))


def completion_tokens(answers: list) -> int | None:
    """Sum of ``usage.completion_tokens`` in the answers' meta, if the backend records it."""
    total, seen = 0, False
    for answer in answers:
        for response in answer:
            usage = (response.meta or {}).get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                total += usage["completion_tokens"]
                seen = True
    return total if seen else None


def measure(args: argparse.Namespace, jobs: list, use_n: bool, concurrency: int) -> dict:
    backend = OpenAICompatBackend(model=args.model, base_url=args.base_url, api_key_env=args.api_key_env,
                                  timeout=args.timeout, max_retries=0, concurrency=concurrency,
                                  max_tokens=args.max_tokens, use_n=use_n)
    times = []
    with backend:
        backend.explain_many(jobs[:1])  # warm-up: connection
        time.sleep(0.5)  # the access log line follows the response
        before = logged_requests(args.server_log)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            answers = backend.explain_many(jobs)
            times.append(time.perf_counter() - t0)
    time.sleep(1.0)
    after = logged_requests(args.server_log)
    elapsed = min(times)  # best of the repeats: the machine is shared
    errors = [a for a in answers if isinstance(a, BaseException)]
    if errors:
        raise SystemExit(f"use_n={use_n} concurrency={concurrency}: {errors[0]!r}")
    failed = sum(not r.ok for a in answers for r in a)
    return {"use_n": use_n, "concurrency": concurrency, "elapsed": elapsed,
            "per_min": 60.0 * len(jobs) / elapsed, "failed": failed,
            "requests": None if before is None else (after - before) // args.repeats, "tokens": completion_tokens(answers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key-env", default="VLLM_CHECK_KEY")
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per setting; the fastest counts")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--server-log", type=Path, default=None, help="the server's log (counts requests)")
    args = parser.parse_args(argv)
    if args.latents < 1 or args.samples < 2 or args.repeats < 1:
        parser.error("--latents and --repeats must be >= 1, --samples >= 2 (n in one request needs n > 1)")
    os.environ.setdefault(args.api_key_env, "local-no-auth")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(var, None)
    torch.set_num_threads(1)
    jobs = make_jobs(args.latents, args.samples)
    print(f"{args.latents} latents x n={args.samples}, max_tokens {args.max_tokens}, best of {args.repeats}, "
          f"server {args.base_url}")
    rows = {}
    for use_n in (True, False):
        for concurrency in (1, 8):
            rows[use_n, concurrency] = r = measure(args, jobs, use_n, concurrency)
            print(f"  measured use_n={use_n} concurrency={concurrency}: {r['elapsed']:.1f} s", flush=True)

    print()
    print(f"{'requests per latent':<24}{'concurrency':>12}{'wall s':>9}{'latents/min':>13}{'requests':>10}"
          f"{'compl. tokens':>15}{'failed':>8}")
    for (use_n, concurrency), r in rows.items():
        label = "1 (n in one request)" if use_n else f"{args.samples} (single requests)"
        requests = "-" if r["requests"] is None else str(r["requests"])
        tokens = "-" if r["tokens"] is None else str(r["tokens"])
        print(f"{label:<24}{concurrency:>12}{r['elapsed']:>9.1f}{r['per_min']:>13.1f}{requests:>10}"
              f"{tokens:>15}{r['failed']:>8}")
    print()
    for concurrency in (1, 8):
        ratio = rows[True, concurrency]["per_min"] / rows[False, concurrency]["per_min"]
        print(f"n in one request / n single requests, concurrency {concurrency}: {ratio:.2f}x latents per minute")
    for use_n in (True, False):
        ratio = rows[use_n, 8]["per_min"] / rows[use_n, 1]["per_min"]
        label = "n in one request" if use_n else "single requests"
        print(f"concurrency 8 / concurrency 1, {label}: {ratio:.2f}x latents per minute")
    # a random model's answer is rarely truncated (a failed sample); only a setting that failed outright counts
    return 1 if any(r["failed"] == args.latents * args.samples for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
