"""Nothing lost: incremental results.json, --resume after SIGKILL / SIGINT, settings check, run lock.

The interruption tests start ``latentexplainer explain`` in a subprocess with a backend slowed down
on purpose: a throw-away plugin distribution (entry point group ``latentexplainer``) registers
backend ``slow`` = the offline explainer plus a log line per latent it is asked about. With
``LE_SLOW_GATE`` set it lets one latent through, then waits before the next one until the gate file
exists: the test interrupts it while it waits, so the run is exactly one latent in however loaded
the machine is (no race between the test's signal and the run's progress).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentexplainer_plugin import plugins
from latentexplainer_plugin import store as store_mod
from latentexplainer_plugin.attribution import LatentExplainer
from latentexplainer_plugin.backends.base import Backend
from latentexplainer_plugin.backends.offline import OfflineBackend
from latentexplainer_plugin.cli import EXIT_INTERRUPTED, main
from latentexplainer_plugin.data.shapes import ShapesSpec, make_dataset
from latentexplainer_plugin.results import LatentResult
from latentexplainer_plugin.run import _runs_latents_concurrently, explain_to_dir
from latentexplainer_plugin.store import LOCK, RESULTS, RunStore, RunStoreError, read_results
from latentexplainer_plugin.types import Response

N_LATENTS = 3

SLOW_PLUGIN = '''
import os, time
from latentexplainer_plugin.hookspecs import hookimpl
from latentexplainer_plugin.backends.offline import OfflineBackend


class SlowOffline(OfflineBackend):
    """The offline explainer, slowed down, logging every latent it is asked to explain."""

    name = "slow"

    asked = 0

    def explain(self, traversal, prompt, n):
        log = os.environ.get("LE_SLOW_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {traversal.latent_id}\\n")
        gate = os.environ.get("LE_SLOW_GATE")
        SlowOffline.asked += 1
        if gate and SlowOffline.asked > 1:
            deadline = time.monotonic() + 600  # the test signals long before; never hang a test run forever
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return super().explain(traversal, prompt, n)


@hookimpl
def latentexplainer_register_backends(register):
    register("slow", lambda arg=None, **kw: SlowOffline())
'''


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A VAE trained for a few steps (3 latents, some with clear explanations) and a reference run."""
    root = tmp_path_factory.mktemp("resume")
    np.savez(root / "data.npz", **make_dataset(64, ShapesSpec(size=16), seed=3))
    # One thread throughout, like the runs compared with this reference (the subprocess has
    # OMP_NUM_THREADS=1, tests run with 1): train-vae's default picks the idle cores and keeps that
    # setting, which made the reference depend on the machine's load.
    threads = torch.get_num_threads()
    try:
        assert main(["train-vae", "--data", str(root / "data.npz"), "--out", str(root / "model"), "--steps", "30",
                     "--latents", str(N_LATENTS), "--batch-size", "8", "--threads", "1", "--quiet"]) == 0
        torch.set_num_threads(1)
        assert main([*explain_args(root, root / "reference"), "--backend", "offline"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A throw-away distribution with an entry point, importable from this directory."""
    root = tmp_path_factory.mktemp("slowplugin")
    (root / "le_slow_plugin.py").write_text(SLOW_PLUGIN)
    info = root / "le_slow_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: le-slow-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[latentexplainer]\nslow = le_slow_plugin\n")
    return root


@pytest.fixture
def slow_here(plugin_dir, monkeypatch, tmp_path):
    """The slow backend in this process (no sleep), logging to a file; returns the log path."""
    log = tmp_path / "calls.log"
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.delenv("LATENTEXPLAINER_NO_PLUGINS", raising=False)
    monkeypatch.delenv("LATENTEXPLAINER_PLUGINS", raising=False)
    monkeypatch.setenv("LE_SLOW_LOG", str(log))
    plugins.reset()
    yield log
    sys.modules.pop("le_slow_plugin", None)
    plugins.reset()


def explain_args(root: Path, out: Path) -> list[str]:
    return ["explain", "--model", str(root / "model"), "--data", str(root / "data.npz"), "--out", str(out),
            "--samples", "2", "--similarity", "bow", "--strengths=-8,0,8", "--quiet"]


def start_slow_run(root: Path, out: Path, plugin_dir: Path, log: Path) -> subprocess.Popen:
    """The run in a subprocess; it finishes one latent, then waits at the gate (``log``'s ``.gate``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LATENTEXPLAINER_NO_PLUGINS", "LATENTEXPLAINER_PLUGINS")}
    env |= {"PYTHONPATH": os.pathsep.join([str(plugin_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "LE_SLOW_LOG": str(log), "LE_SLOW_GATE": str(log.with_suffix(".gate")), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "latentexplainer_plugin.cli", *explain_args(root, out), "--backend", "slow"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_first_latent(proc: subprocess.Popen, out: Path, log: Path, timeout: float = 300) -> dict:
    """Wait until the run has written its first latent and asked the backend for the second one
    (it then waits at the gate); every read of results.json on the way must be a valid results file.
    The loop polls files the run writes: its pause is a polling interval, not a guess at timing."""
    path = out / RESULTS
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if path.exists():
            data = read_results(path)  # never a partial file, whenever we look
            if data["latents"] and len(log_lines(log)) >= 2:
                return data
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no latent was finished in time")


def comparable(entry: dict) -> dict:
    """An entry without timing (and with certainty rounded): what must equal an uninterrupted run."""
    out = {k: v for k, v in entry.items() if k != "timing"}
    if out.get("certainty") is not None:
        out["certainty"] = round(out["certainty"], 9)
    return out


def log_lines(log: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()) for line in log.read_text().splitlines()] if log.exists() else []


def check_complete_entries(out: Path, data: dict) -> None:
    for e in data["latents"]:
        assert e["status"] == "ok" and len(e["responses"]) == 2
        assert 0.0 <= e["certainty"] <= 1.0
        with Image.open(out / e["strip"]) as im:  # the strip an entry names is a whole PNG
            im.load()


def check_equals_reference(tiny: Path, out: Path) -> None:
    ref = read_results(tiny / "reference" / RESULTS)
    got = read_results(out / RESULTS)
    assert got["status"] == "complete"
    assert [comparable(e) for e in got["latents"]] == [comparable(e) for e in ref["latents"]]
    for e in got["latents"]:
        a = np.asarray(Image.open(out / e["strip"]))
        b = np.asarray(Image.open(tiny / "reference" / e["strip"]))
        assert np.array_equal(a, b), e["id"]
    assert (out / "report.html").is_file()
    assert not (out / LOCK).exists()
    assert not list(out.glob(".*.tmp")) and not list((out / "strips").glob(".*.tmp"))


def test_reference_run_has_clear_and_unclear_latents(tiny):
    """The comparison below is only meaningful when the run says something."""
    ref = read_results(tiny / "reference" / RESULTS)
    assert len(ref["latents"]) == N_LATENTS
    assert any(e["clear"] for e in ref["latents"]) or any(not r["abstained"] for e in ref["latents"] for r in e["responses"])


# -- interruption in a subprocess ----------------------------------------------------------------


def test_sigkill_midway_then_resume(tiny, plugin_dir, slow_here, tmp_path):
    out = tmp_path / "run"
    log = slow_here
    proc = start_slow_run(tiny, out, plugin_dir, log)
    try:
        wait_for_first_latent(proc, out, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    data = read_results(out / RESULTS)  # valid JSON, only complete entries
    assert data["status"] == "running"
    killed_done = {e["id"] for e in data["latents"]}
    assert killed_done == {log_lines(log)[0][1]}  # one latent: the run waits at the gate before its second
    check_complete_entries(out, data)
    first = log_lines(log)

    # the same command with --resume (here, in-process) finishes the rest and repeats nothing done
    assert main([*explain_args(tiny, out), "--backend", "slow", "--resume"]) == 0
    resumed = [lid for pid, lid in log_lines(log)[len(first):]]
    assert not killed_done & set(resumed), f"finished latents were computed again: {killed_done & set(resumed)}"
    assert len(resumed) == len(set(resumed))
    assert killed_done | set(resumed) == {f"z{i}" for i in range(N_LATENTS)}
    check_equals_reference(tiny, out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_says_resume_then_resume(tiny, plugin_dir, slow_here, tmp_path, signum):
    out = tmp_path / "run"
    log = slow_here
    proc = start_slow_run(tiny, out, plugin_dir, log)
    try:
        wait_for_first_latent(proc, out, log)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted" in err and "--resume" in err and str(out) in err
    assert "Traceback" not in err
    data = read_results(out / RESULTS)
    assert data["status"] == "interrupted"
    done = {e["id"] for e in data["latents"]}
    assert done == {log_lines(log)[0][1]}  # one latent: the run waited at the gate before its second
    check_complete_entries(out, data)
    assert not (out / LOCK).exists()  # released on the way out

    first = log_lines(log)
    assert main([*explain_args(tiny, out), "--backend", "slow", "--resume"]) == 0
    resumed = [lid for pid, lid in log_lines(log)[len(first):]]
    assert not done & set(resumed) and len(resumed) == len(set(resumed))
    check_equals_reference(tiny, out)


# -- the same logic in-process (fast): interrupt, resume, count backend calls ----------------------


class CountingBackend(Backend):
    """A cheap deterministic backend that records which latents it was asked about."""

    name = "counting"

    def __init__(self, interrupt_at: str | None = None):
        self.calls: list[str] = []
        self.interrupt_at = interrupt_at

    def explain(self, traversal, prompt, n):
        if traversal.latent_id == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append(traversal.latent_id)
        brightness = float(traversal.images[0, 0, -1].mean() - traversal.images[0, 0, 0].mean())
        text = f"Increasing {traversal.latent_id} makes the image {'brighter' if brightness > 0 else 'darker'}."
        return [Response(text=text) for _ in range(n)]


def make_explainer(vae, backend) -> LatentExplainer:
    return LatentExplainer(vae, backend=backend, samples=2, similarity="bow", strengths=[-2.0, 0.0, 2.0])


def test_interrupt_in_process_then_resume_calls_backend_only_for_the_rest(tiny_vae, tmp_path):
    ref_backend = CountingBackend()
    ref = explain_to_dir(make_explainer(tiny_vae, ref_backend), tmp_path / "ref", progress=False)
    assert ref_backend.calls == ["z0", "z1", "z2", "z3"]

    out = tmp_path / "run"
    first = CountingBackend(interrupt_at="z2")
    with pytest.raises(KeyboardInterrupt):
        explain_to_dir(make_explainer(tiny_vae, first), out, progress=False)
    data = read_results(out / RESULTS)
    assert data["status"] == "interrupted" and [e["id"] for e in data["latents"]] == ["z0", "z1"]
    assert not (out / LOCK).exists()

    with pytest.raises(RunStoreError, match="resume=True"):  # not silently redone or mixed
        explain_to_dir(make_explainer(tiny_vae, CountingBackend()), out, progress=False)
    second = CountingBackend()
    final = explain_to_dir(make_explainer(tiny_vae, second), out, resume=True, progress=False)
    assert second.calls == ["z2", "z3"]
    assert [comparable(e) for e in final["latents"]] == [comparable(e) for e in ref["latents"]]

    third = CountingBackend()  # resuming a complete run calls nothing and rewrites nothing
    again = explain_to_dir(make_explainer(tiny_vae, third), out, resume=True, progress=False)
    assert third.calls == [] and [comparable(e) for e in again["latents"]] == [comparable(e) for e in ref["latents"]]


def test_failed_latents_are_retried_on_resume(tiny_vae, tmp_path):
    class Flaky(CountingBackend):
        def explain(self, traversal, prompt, n):
            if traversal.latent_id == "z1" and self.fail:
                raise RuntimeError("server said no")
            return super().explain(traversal, prompt, n)

    flaky = Flaky()
    flaky.fail = True
    data = explain_to_dir(make_explainer(tiny_vae, flaky), tmp_path, progress=False)
    assert [e["status"] for e in data["latents"]] == ["ok", "failed", "ok", "ok"]
    assert "server said no" in data["latents"][1]["error"]
    flaky2 = Flaky()
    flaky2.fail = False
    data = explain_to_dir(make_explainer(tiny_vae, flaky2), tmp_path, resume=True, progress=False)
    assert flaky2.calls == ["z1"] and [e["status"] for e in data["latents"]] == ["ok"] * 4


def test_each_latent_is_written_as_soon_as_it_is_done(tiny_vae, tmp_path):
    """With the sequential offline backend, results.json holds latent k while latent k+1 is explained."""
    seen: list[list[str]] = []

    class Peeking(CountingBackend):
        def explain(self, traversal, prompt, n):
            seen.append([e["id"] for e in read_results(tmp_path / RESULTS)["latents"]])
            return super().explain(traversal, prompt, n)

    explainer = make_explainer(tiny_vae, Peeking())
    assert explainer.chunk_size > 1  # the explainer's own setting is restored afterwards
    explain_to_dir(explainer, tmp_path, progress=False)
    assert seen == [[], ["z0"], ["z0", "z1"], ["z0", "z1", "z2"]]
    assert explainer.chunk_size == 16


def test_chunking_decision():
    from latentexplainer_plugin.cache import CachedBackend, ResponseCache

    class Concurrent(Backend):
        name = "concurrent"
        concurrency = 4

        def explain(self, traversal, prompt, n):
            return []

        def explain_many(self, jobs):
            return [self.explain(*j) for j in jobs]

    assert not _runs_latents_concurrently(OfflineBackend())
    assert not _runs_latents_concurrently(CachedBackend(OfflineBackend(), ResponseCache(enabled=False)))
    assert _runs_latents_concurrently(Concurrent())
    assert _runs_latents_concurrently(CachedBackend(Concurrent(), ResponseCache(enabled=False)))


# -- the run store itself ---------------------------------------------------------------------------


SETTINGS = {"samples": 2, "strengths": (-1.0, 1.0), "backend": {"name": "offline"}}


def result(i: int) -> LatentResult:
    return LatentResult(f"z{i}", i, "ok", explanation=f"latent {i} moves", certainty=0.5, clear=True)


def test_results_json_reflects_exactly_the_finished_latents(tmp_path):
    store = RunStore(tmp_path, {"model": "m"}, SETTINGS)
    assert read_results(tmp_path / RESULTS)["latents"] == []
    for i in (2, 0, 1):
        store.add(result(i))
        on_disk = read_results(tmp_path / RESULTS)
        assert on_disk["status"] == "running"
        assert sorted(e["index"] for e in on_disk["latents"]) == sorted(store.entries[k]["index"] for k in store.entries)
    data = store.finish()
    assert data["status"] == "complete" and [e["id"] for e in data["latents"]] == ["z0", "z1", "z2"]
    assert data["settings"]["strengths"] == [-1.0, 1.0]  # JSON form; a resume compares equal
    assert oct((tmp_path / RESULTS).stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    RunStore(tmp_path, {"model": "m"}, SETTINGS, resume=True).release()


def test_other_settings_are_refused_unless_force(tmp_path):
    store = RunStore(tmp_path, {}, SETTINGS)
    store.add(result(0))
    store.finish()
    other = SETTINGS | {"samples": 5}
    for resume in (False, True):
        with pytest.raises(RunStoreError, match=r"other settings \(samples: 2 -> 5\).*force=True"):
            RunStore(tmp_path, {}, other, resume=resume)
    assert read_results(tmp_path / RESULTS)["settings"]["samples"] == 2  # untouched
    with pytest.raises(RunStoreError, match="pass resume=True to continue it or force=True"):
        RunStore(tmp_path, {}, SETTINGS)
    forced = RunStore(tmp_path, {}, other, force=True)
    assert forced.entries == {} and read_results(tmp_path / RESULTS)["latents"] == []
    forced.release()


def test_unreadable_results_json_is_refused_with_a_way_out(tmp_path):
    (tmp_path / RESULTS).write_text('{"schema_version": 1, "latents": [')
    with pytest.raises(RunStoreError, match="not valid JSON.*force=True"):
        RunStore(tmp_path, {}, SETTINGS, resume=True)
    assert (tmp_path / RESULTS).read_text() == '{"schema_version": 1, "latents": ['
    RunStore(tmp_path, {}, SETTINGS, force=True).release()
    assert read_results(tmp_path / RESULTS)["latents"] == []


def test_lock_keeps_a_second_process_out(tmp_path):
    """A child process holds the run; this process is refused until the child is gone."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the store until told to exit (then die without releasing)
        try:
            os.close(ready_r)
            os.close(go_w)
            RunStore(tmp_path, {}, SETTINGS)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        assert os.read(ready_r, 1) == b"1"
        with pytest.raises(RunStoreError, match=rf"in use by another run \(process {pid}\)"):
            RunStore(tmp_path, {}, SETTINGS, resume=True)
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
    # the child died holding it: the kernel dropped the lock, the stale file is taken over
    assert (tmp_path / LOCK).exists()
    RunStore(tmp_path, {}, SETTINGS, resume=True).release()
    assert not (tmp_path / LOCK).exists()


def test_lock_keeps_a_second_store_in_this_process_out(tmp_path):
    first = RunStore(tmp_path, {}, SETTINGS)
    with pytest.raises(RunStoreError, match="in use by another run in this process"):
        RunStore(tmp_path / "sub" / "..", {}, SETTINGS, resume=True)
    first.release()
    first.release()  # idempotent
    RunStore(tmp_path, {}, SETTINGS, resume=True).release()


def test_pid_file_lock_without_flock(tmp_path, monkeypatch):
    """Where there is no flock, a pid file: a live pid keeps others out, a dead one is stale."""
    monkeypatch.setattr(store_mod, "fcntl", None)
    (tmp_path / LOCK).write_text("1")  # pid 1 is always alive
    with pytest.raises(RunStoreError, match=r"in use by another run \(process 1\)"):
        RunStore(tmp_path, {}, SETTINGS)
    assert not (tmp_path / RESULTS).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(str(dead.pid))
    store = RunStore(tmp_path, {}, SETTINGS)
    assert (tmp_path / LOCK).read_text() == str(os.getpid())
    store.finish()
    assert not (tmp_path / LOCK).exists()


def test_temp_files_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "strips").mkdir()
    leftovers = [tmp_path / f".{RESULTS}.abc123.tmp", tmp_path / ".report.html.x.tmp", tmp_path / "strips" / ".z1.png.99.tmp"]
    for p in leftovers:
        p.write_text("half")
    mine = tmp_path / ".notes.tmp"  # not ours: kept
    mine.write_text("user file")
    RunStore(tmp_path, {}, SETTINGS).release()
    assert not any(p.exists() for p in leftovers) and mine.exists()


def test_non_finite_and_numpy_values_are_written_as_strict_json(tmp_path):
    store = RunStore(tmp_path, {"model": "m"}, SETTINGS)
    store.add(result(0), {"kl": float("nan"), "score": np.float32(0.25), "rank": np.int64(3), "v": torch.tensor([1.0])})
    text = (tmp_path / RESULTS).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    entry = store.finish()["latents"][0]
    assert entry["kl"] is None and entry["score"] == 0.25 and entry["rank"] == 3 and entry["v"] == [1.0]
