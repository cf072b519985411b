"""Property tests: the results.json reader, the prompt builder, RunStore and atomic_write_text.

(The uncertainty module has its own hypothesis tests in tests/test_uncertainty.py.)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentexplainer_plugin.biases.base import build_prompt
from latentexplainer_plugin.biases.builtin import BUILTIN_BIASES
from latentexplainer_plugin.results import LatentResult
from latentexplainer_plugin.store import RESULTS, RunStore, atomic_write_text, entry_problems, read_results, strip_name
from latentexplainer_plugin.types import Response, Traversal

CORE = ("id", "index", "status", "explanation", "certainty", "clear", "responses", "strip", "error")
PROPS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
jsonish = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                       max_leaves=20)
finite_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
small_json = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                          max_leaves=5)
latent_ids = st.text(min_size=1, max_size=30)
statuses = st.sampled_from(["ok", "failed", "skipped"])

near_entries = st.fixed_dictionaries(
    {},
    optional={
        "id": latent_ids | jsonish,
        "index": st.integers(-3, 50) | jsonish,
        "status": statuses | jsonish,
        "certainty": st.floats(0, 1) | jsonish,
        "responses": jsonish,
    },
)
near_results = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.sampled_from([1, 1.0, True, "1", 2, 0, None]),
        "latents": st.lists(near_entries | jsonish, max_size=4) | jsonish,
        "settings": jsonish,
        "status": jsonish,
    },
)
valid_entries = st.fixed_dictionaries(
    {"id": latent_ids, "index": st.integers(0, 10**6), "status": statuses},
    optional={"explanation": st.none() | st.text(), "certainty": st.none() | st.floats(0, 1), "extra": finite_json},
)
valid_results = st.fixed_dictionaries(
    {"schema_version": st.just(1), "latents": st.lists(valid_entries, max_size=5)},
    optional={"settings": st.dictionaries(st.text(max_size=8), finite_json, max_size=4), "status": statuses, "model": finite_json},
)


# Thousands of small writes: on a RAM file system when there is one (fsync/rename on a busy disk
# would dominate the run time; what is tested is the logic, not the disk).
RAM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="le-props-", dir=RAM) as tmp:
        yield Path(tmp)


# -- read_results ----------------------------------------------------------------------------------------


def _check_usable(data: dict) -> None:
    """What RunStore relies on in anything read_results accepts."""
    assert data["schema_version"] == 1
    ids = {e["id"] for e in data["latents"]}  # hashable
    assert all(isinstance(i, str) and i for i in ids)
    sorted(data["latents"], key=lambda e: e["index"])  # comparable


@PROPS
@given(payload=near_results | jsonish)
def test_reader_accepts_or_raises_value_error_on_any_json(scratch, payload):
    path = scratch / "any.json"
    path.write_text(json.dumps(payload, allow_nan=True))
    try:
        data = read_results(path)
    except ValueError as exc:
        assert str(exc)
        return
    _check_usable(data)


@PROPS
@given(blob=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_reader_on_arbitrary_bytes_raises_only_value_error(scratch, blob):
    path = scratch / "bytes.json"
    path.write_bytes(blob)
    try:
        _check_usable(read_results(path))
    except ValueError:
        pass


@PROPS
@given(data=valid_results)
def test_valid_results_round_trip(scratch, data):
    path = scratch / "valid.json"
    path.write_text(json.dumps(data))
    assert read_results(path) == json.loads(json.dumps(data))


def test_reader_edge_cases(scratch):
    deep = scratch / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON|not a results file"):
        read_results(deep)
    with pytest.raises(ValueError, match="is a directory, not a regular file"):
        read_results(scratch)  # a directory
    with pytest.raises(ValueError, match="does not exist"):
        read_results(scratch / "missing.json")


# -- build_prompt ------------------------------------------------------------------------------------------


@st.composite
def traversals(draw):
    bias = draw(st.sampled_from(BUILTIN_BIASES))
    steps = draw(st.integers(2, 6))
    strengths = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=steps, max_size=steps))
    n_bases = draw(st.integers(1, 3))
    rows = bias.rows
    labels = draw(st.lists(st.text(max_size=20), min_size=rows, max_size=rows))
    clamped = draw(st.none() | st.integers(0, 99))
    seed = draw(st.integers(0, 2**16))
    images = torch.rand(n_bases, rows, steps, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    traversal = Traversal(draw(latent_ids), images, torch.tensor(strengths, dtype=torch.float64), "set",
                          row_labels=labels, meta={"clamped": clamped})
    context = {k: draw(st.text(min_size=1, max_size=20).filter(str.strip)) for k in bias.requires}
    return bias, traversal, context


@PROPS
@given(case=traversals())
def test_prompt_builder_never_raises_names_the_latent_and_is_deterministic(case):
    bias, traversal, context = case
    first = build_prompt(bias, traversal, dict(context))
    second = build_prompt(bias, traversal, dict(context))
    assert traversal.latent_id in first.text
    assert first.bias == bias.name and len(first.images) == 1
    assert first.text == second.text
    assert first.images[0].tobytes() == second.images[0].tobytes()
    for value in context.values():
        assert value in first.text
    if bias.rows > 1:
        for label in traversal.row_labels:
            assert label in first.text


# -- atomic_write_text and RunStore ----------------------------------------------------------------------------


@PROPS
@given(old=st.text(max_size=50), new=st.text(max_size=300))
def test_atomic_write_replaces_whole_or_not_at_all(scratch, old, new):
    path = scratch / "atomic.txt"
    path.write_bytes(old.encode("utf-8", "surrogatepass"))
    try:
        new.encode("utf-8")
    except UnicodeEncodeError:  # not writable as UTF-8: refused, the old file stays
        with pytest.raises(UnicodeEncodeError):
            atomic_write_text(path, new)
        assert path.read_bytes() == old.encode("utf-8", "surrogatepass")
    else:
        atomic_write_text(path, new)
        assert path.read_bytes().decode("utf-8") == new.replace("\n", os.linesep)
    assert not list(scratch.glob(".atomic.txt.*.tmp"))


responses = st.lists(st.builds(Response, text=st.none() | st.text(max_size=30), error=st.none() | st.text(max_size=10),
                               abstained=st.booleans()), max_size=2)


@st.composite
def results(draw):
    out, used = [], set()
    for index in draw(st.lists(st.integers(0, 40), unique=True, max_size=4)):
        lid = draw(latent_ids.filter(lambda s: s not in used))
        used.add(lid)
        traversal = None
        if draw(st.booleans()):
            traversal = Traversal(lid, torch.rand(1, 1, 2, 3, 4, 4), torch.tensor([-1.0, 1.0]), "set")
        out.append(LatentResult(lid, index, draw(statuses), explanation=draw(st.none() | st.text(max_size=30)),
                                certainty=draw(st.none() | st.floats(0, 1)), clear=draw(st.booleans()),
                                responses=draw(responses), traversal=traversal, error=draw(st.none() | st.text(max_size=20)),
                                timing={"select_s": draw(st.floats(0, 10))}))
    return out, [draw(st.dictionaries(st.text(max_size=6), small_json, max_size=3)) for _ in out]


def normalised(value):
    return json.loads(json.dumps(value, allow_nan=True), parse_constant=lambda c: None)


@PROPS
@given(header=st.dictionaries(st.text(max_size=8), small_json, max_size=3),
       run_settings=st.dictionaries(st.text(max_size=8), small_json | st.tuples(st.floats(), st.integers()), max_size=3),
       found=results())
def test_run_store_round_trip_and_resume(header, run_settings, found):
    latents, extras = found
    with tempfile.TemporaryDirectory(prefix="le-props-", dir=RAM) as tmp:
        run = Path(tmp) / "run"
        store = RunStore(run, header, run_settings)
        for result, extra in zip(latents, extras):
            store.add(result, extra)
            json.loads((run / RESULTS).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
        data = store.finish()

        statuses = [r.status for r in latents]  # complete only when every latent is ok
        expected_status = ("complete" if all(s == "ok" for s in statuses) else
                           "failed" if "ok" not in statuses and "failed" in statuses else "incomplete")
        assert data["schema_version"] == 1 and data["status"] == expected_status
        for key, value in header.items():
            if key not in ("schema_version", "settings", "status", "counts", "latents"):
                assert normalised(data[key]) == _finite(normalised(value))
        by_id = {e["id"]: e for e in data["latents"]}
        assert [e["index"] for e in data["latents"]] == sorted(r.index for r in latents)
        for result, extra in zip(latents, extras):
            entry = by_id[result.id]
            core = result.to_json(entry["strip"])
            expected = _finite(normalised(core | extra | {k: core[k] for k in CORE}))
            assert entry == expected
            if result.traversal is not None:
                strip = run / entry["strip"]
                assert strip.is_file() and strip.parent == run / "strips" and strip.name == f"{strip_name(result.id)}.png"
            else:
                assert entry["strip"] is None

        # a resume with the same (not yet JSON-normalised) settings is accepted and keeps the ok entries
        # that pass its checks; a well-formed one (its strip written, clear only with an explanation,
        # no extra overriding a checked key) always passes
        again = RunStore(run, header, run_settings, resume=True)
        assert set(again.entries) == {e["id"] for e in data["latents"] if e["status"] == "ok" and not entry_problems(e, run)}
        for result, extra in zip(latents, extras):
            if (result.status == "ok" and result.traversal is not None and not {"timing", "usage"} & set(extra)
                    and (not result.clear or (result.explanation or "").strip())):
                assert result.id in again.entries
        again.release()
        assert not (run / ".lock").exists()


def _finite(value):
    """What the store writes for a value: NaN/inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
