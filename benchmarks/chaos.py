"""Chaos run: `latentexplainer explain` with the openai backend against a faulty server, killed with
SIGKILL at random points and resumed, N rounds. Nothing paid for may be lost.

A loopback chat-completions server (tests/loopback_server.py) gives each request a fate drawn
from ``Random(seed:round:ordinal)``: dropped connection, HTTP 500, 429 with Retry-After, a body
trickled one byte per 0.2 s (only the request deadline ends it), malformed JSON, an oversized body
or a gzip bomb, else a normal answer after 20-200 ms. Each round explains the shipped demo VAE's
10 latents (``--model latentexplainer_plugin/demo/weights``) into a fresh run directory and cache;
the CLI is started as a subprocess, killed with SIGKILL at ``--kills`` random points (after a
random number of requests reached the server, plus a random 0-300 ms), then rerun with
``--resume`` until it exits by itself.

Printed per round and in total:

* answers received: choices the server answered (normal 200 replies; a reply to a client killed
  a moment before counts too);
* answers persisted: entries in the response cache at the end (10 latents x samples when done);
* answers paid twice: choices the server answered again for a (latent, sample) it had already
  answered (in flight when a kill came, or answered after the client's deadline);
* lost after arrival: at each kill, answers whose reply had been written at least 0.5 s before it
  (and within the client's deadline, so the client was reading) but that are not in the cache
  (the answers name their latent and sample): must be 0 (before
  answers were cached one by one, a kill lost every answer of the round in flight);
* latents lost: target latents without an entry in results.json after the last run (must be 0);
* wall time.

Usage: ``nice -n 10 python benchmarks/chaos.py --rounds 5``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from loopback_server import Fault, LoopbackServer, Reply  # noqa: E402

KEY = "sk-chaos-not-a-real-key"
MARGIN = 0.5  # s: an answer written this long before a kill has surely reached the client
TIMEOUT = 2.0  # s: --timeout of the runs (the client abandons a request after this)
FATES = [  # (name, probability)
    ("drop", 0.08), ("500", 0.08), ("429", 0.08), ("trickle", 0.04), ("malformed", 0.05), ("oversized", 0.03),
    ("gzip-bomb", 0.02),
]


class ChaosServer(LoopbackServer):
    """A loopback server that draws a fate for every request and counts the answers it delivers."""

    def __init__(self, round_seed: str, samples: int) -> None:
        super().__init__(answer=self._answer)
        self.round_seed = round_seed
        self.samples = samples
        self.delivered: Counter[tuple[str, int]] = Counter()  # (latent, sample) -> times answered
        # (latent, sample) -> (when its request arrived, when the reply was written), per delivery
        self.sent_at: dict[tuple[str, int], list[tuple[float, float]]] = {}
        self.fates: Counter[str] = Counter()
        self.respond = self._fate
        self._local = threading.local()  # the request a handler thread is answering normally

    @staticmethod
    def _latent(request) -> str:
        match = re.search(r"\b(z\d+)\b", " ".join(request.text_parts()))
        return match.group(1) if match else "?"

    def _answer(self, request, i: int) -> str:
        return f"The object changes with {self._latent(request)} (sample {i})."

    def _fate(self, request) -> Reply | None:
        rng = random.Random(f"{self.round_seed}:{request.ordinal}")
        draw, edge = rng.random(), 0.0
        for name, p in FATES:
            edge += p
            if draw < edge:
                self.fates[name] += 1
                return {
                    "drop": Fault.drop, "500": lambda: Fault.status(500, message="chaos"),
                    "429": lambda: Fault.status(429, retry_after=0.05, message="slow down"),
                    "trickle": lambda: Fault.trickle(seconds=20, interval=0.2), "malformed": Fault.malformed,
                    "oversized": Fault.oversized, "gzip-bomb": lambda: Fault.oversized(gzip_bomb=True),
                }[name]()
        self.fates["ok"] += 1
        time.sleep(rng.uniform(0.02, 0.2))
        self.count(request)
        self._local.request = request
        return None  # the normal answer

    def _done(self) -> None:  # called by the handler thread after its reply was written (or failed)
        super()._done()
        request, self._local.request = getattr(self._local, "request", None), None
        if request is not None:
            now, latent = time.monotonic(), self._latent(request)
            with self._lock:
                for i in range(request.n):
                    self.sent_at.setdefault((latent, i), []).append((request.time, now))

    def count(self, request) -> None:
        latent = self._latent(request)
        with self._lock:
            for i in range(request.n):
                self.delivered[(latent, i)] += 1


def persisted_answers(cache: Path) -> set[tuple[str, int]]:
    """(latent, sample) of every answer in the cache (the chaos answers name both in their text)."""
    found = set()
    for path in cache.rglob("*.json"):
        match = re.search(r"with (z\d+) \(sample (\d+)\)", json.loads(path.read_text())["response"]["text"])
        if match:
            found.add((match.group(1), int(match.group(2))))
    return found


def arrived_not_persisted(server: ChaosServer, cache: Path, since: float, kill: float) -> set[tuple[str, int]]:
    """Answers to requests of the run killed at ``kill`` (asked after ``since``, when it started)
    whose reply was written at least MARGIN s before the kill and before the client's deadline ran
    out (so the client was reading it) but that are not in the cache: lost paid work."""
    stored = persisted_answers(cache)
    with server._lock:
        arrived = {key for key, deliveries in server.sent_at.items() for asked, written in deliveries
                   if asked > since and kill - written >= MARGIN and written - asked < TIMEOUT - MARGIN}
    return arrived - stored


def run_round(r: int, args: argparse.Namespace, workdir: Path) -> dict:
    out, cache = workdir / f"run{r}", workdir / f"cache{r}"
    server = ChaosServer(f"{args.seed}:{r}", args.samples).start()
    rng = random.Random(f"{args.seed}:kills:{r}")
    env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1", "LATENTEXPLAINER_NO_PLUGINS": "1"}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "latentexplainer_plugin.cli", "explain", "--model", str(ROOT / "latentexplainer_plugin/demo/weights"),
           "--backend", "openai:chaos", "--base-url", server.url, "--samples", str(args.samples), "--out", str(out),
           "--cache-dir", str(cache), "--quiet", "--timeout", str(TIMEOUT), "--max-retries", "6", "--concurrency", "4",
           "--similarity", "bow"]
    kills, runs, codes, kill_times, lost_after_arrival = 0, 0, [], [], 0
    try:
        for attempt in range(args.kills + 20):
            runs += 1
            first = not (out / "results.json").exists()
            started = time.monotonic()
            child = subprocess.Popen(cmd + ([] if first else ["--resume"]), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
            if kills < args.kills:
                target = len(server.requests) + rng.randint(1, 12)
                while len(server.requests) < target and child.poll() is None:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.3))
                if child.poll() is None:
                    kill_times.append(time.monotonic())
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                    kills += 1
                    lost_after_arrival += len(arrived_not_persisted(server, cache, started, kill_times[-1]))
            try:
                _, err = child.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                child.kill()
                _, err = child.communicate()
            codes.append(child.returncode)
            if child.returncode in (0, 1) and kills >= args.kills:
                break
            if child.returncode not in (0, 1, -signal.SIGKILL):
                print(f"  round {r}: exit {child.returncode}: {err.decode(errors='replace').strip()[-300:]}")
    finally:
        server.stop()
    data = json.loads((out / "results.json").read_text())
    present = {e["index"] for e in data["latents"]}
    lost = sorted(set(range(10)) - present)
    received = sum(server.delivered.values())
    twice = sum(c - 1 for c in server.delivered.values() if c > 1)
    persisted = len(list(cache.rglob("*.json")))
    return {"round": r, "runs": runs, "kills": kills, "exit_codes": codes, "status": data["status"],
            "received": received, "persisted": persisted, "paid_twice": twice, "lost": lost,
            "lost_after_arrival": lost_after_arrival,
            "failed": sum(e["status"] == "failed" for e in data["latents"]),
            "fates": dict(server.fates)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILLs per round before the run may finish")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    totals = Counter()
    lost_any = False
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        for r in range(args.rounds):
            t0 = time.perf_counter()
            res = run_round(r, args, Path(tmp))
            lost_any |= bool(res["lost"])
            for k in ("runs", "kills", "received", "persisted", "paid_twice", "lost_after_arrival", "failed"):
                totals[k] += res[k]
            totals["lost"] += len(res["lost"])
            print(f"round {r}: {res['runs']} runs ({res['kills']} killed), exits {res['exit_codes']}, status {res['status']}; "
                  f"answers received {res['received']}, persisted {res['persisted']}, paid twice {res['paid_twice']} "
                  f"(lost after arrival {res['lost_after_arrival']}); "
                  f"latents lost {len(res['lost'])}, failed {res['failed']}; {time.perf_counter() - t0:.1f} s; "
                  f"fates {res['fates']}")
    wall = time.perf_counter() - started
    print(f"total: {args.rounds} rounds, {totals['runs']} runs, {totals['kills']} SIGKILLs; answers received "
          f"{totals['received']}, answers persisted {totals['persisted']}, paid twice {totals['paid_twice']} "
          f"(lost after arrival {totals['lost_after_arrival']}, must be 0); "
          f"latents lost {totals['lost']} (must be 0), latents failed {totals['failed']}; wall time {wall:.1f} s")
    return 1 if lost_any or totals["lost_after_arrival"] else 0


if __name__ == "__main__":
    sys.exit(main())
