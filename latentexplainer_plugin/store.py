"""The run directory: results.json written atomically after every latent, strips/*.png, a run lock.

results.json is always valid JSON reflecting exactly the finished latents: each update writes a
temp file, fsyncs it and renames it over the old one. A strip is written (the same way) before
the entry that names it, so an entry never points at a missing or half-written PNG.

The lock is an ``flock`` on ``RUN/.lock`` where the OS has it (released by the kernel when the
process dies, however it dies), else a pid file whose process must still be alive. Locks held by
this process are tracked too, so two stores in one process cannot share a directory either.

Every file is written and read back through :mod:`.safe_io`: no link is followed, a FIFO or other
special file in the way is refused, temp files never outlive a failed write. On ``--resume`` each
finished entry is checked (:func:`entry_problems`) before it is kept; an entry that fails is
computed again, and the reason is printed and recorded in ``resume_notes``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

from . import safe_io
from .report.strips import grid
from .results import SCHEMA_VERSION, LatentResult
from .safe_io import UnsafePathError, atomic_write_text  # noqa: F401 - atomic_write_text: used from here by others
from .errors import RunStoreError  # noqa: F401 (re-exported)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: pid-file lock
    fcntl = None  # type: ignore[assignment]

RESULTS = "results.json"
LOCK = ".lock"
STATUSES = ("ok", "failed", "skipped")
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

_CORE = ("id", "index", "status", "explanation", "certainty", "clear", "responses", "strip", "error", "evidence")
_RESERVED = ("schema_version", "settings", "status", "counts", "latents")  # header keys the store writes itself
RUN_STATUSES = ("running", "complete", "incomplete", "failed", "interrupted")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

_held: set[str] = set()  # run directories locked by this process
_held_guard = threading.Lock()


def _jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON data: tuples -> lists, numpy scalars -> numbers, NaN/inf -> None."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(obj.tolist())
    return str(obj)


def strip_name(latent_id: str) -> str:
    """A file name for a latent's strip: the id itself when it is a plain name (``z3``, ``dir0``),
    else a sanitised form plus a hash of the id (no path separators, no clashes)."""
    if _SAFE_NAME.fullmatch(latent_id) and not latent_id.endswith("."):
        return latent_id
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", latent_id).strip("._")[:60] or "latent"
    return f"{safe}-{hashlib.sha1(latent_id.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def read_results(path: str | Path, *, check_entries: bool = True) -> dict[str, Any]:
    """Read and check a results.json; raises ValueError (only) saying what is wrong.

    ``check_entries=False`` checks the file's frame only (an object, its schema version, a
    ``latents`` list): a resume checks each entry itself and recomputes the ones that fail.
    """
    path = Path(path)
    try:
        data = json.loads(safe_io.read_text(path))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except UnsafePathError as exc:
        raise ValueError(str(exc)) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("latents"), list):
        raise ValueError(f"{path} is not a results file: expected an object with a 'latents' list")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r}; this version reads {SCHEMA_VERSION}")
    for i, entry in enumerate(data["latents"] if check_entries else ()):
        problem = _frame_problem(entry, i)
        if problem:
            raise ValueError(f"{path}: {problem}")
    if "settings" in data and not isinstance(data["settings"], dict):
        raise ValueError(f"{path}: 'settings' must be an object")
    return data


def _frame_problem(entry: Any, i: int) -> str | None:
    """What makes entry ``i`` unusable as an entry at all (no id, index or status of the right kind)."""
    if not isinstance(entry, dict) or not {"id", "index", "status"} <= set(entry):
        return f"latent entry {i} lacks id/index/status"
    if not isinstance(entry["id"], str) or not entry["id"]:
        return f"latent entry {i} has id {entry['id']!r}; expected a non-empty string"
    if type(entry["index"]) is not int or entry["index"] < 0:
        return f"latent {entry['id']!r} has index {entry['index']!r}; expected an integer >= 0"
    if not isinstance(entry["status"], str) or entry["status"] not in STATUSES:
        return f"latent {entry['id']!r} has unknown status {entry['status']!r} (allowed: {', '.join(STATUSES)})"
    return None


_PHANTOM = "not a latent of this run"
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _usage_problem(usage: Any, where: str) -> str | None:
    """``usage`` must be null or an object whose token counts (when present) are integers >= 0."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return f"{where}usage is {type(usage).__name__}, expected an object"
    for key in _USAGE_KEYS:
        if key in usage and usage[key] is not None and not (type(usage[key]) is int and usage[key] >= 0):
            return f"{where}usage.{key} is {usage[key]!r}, expected an integer >= 0"
    return None


def _response_problem(response: Any, k: int) -> str | None:
    where = f"response {k}: "
    if not isinstance(response, dict):
        return f"{where}is {type(response).__name__}, expected an object"
    if response.get("text") is not None and not isinstance(response["text"], str):
        return f"{where}text is {type(response['text']).__name__}, expected a string or null"
    if "abstained" in response and not isinstance(response["abstained"], bool):
        return f"{where}abstained is {response['abstained']!r}, expected true or false"
    if response.get("error") is not None and not isinstance(response["error"], str):
        return f"{where}error is {type(response['error']).__name__}, expected a string or null"
    if response.get("finish_reason") is not None and not isinstance(response["finish_reason"], str):
        return f"{where}finish_reason is {response['finish_reason']!r}, expected a string or null"
    return _usage_problem(response.get("usage"), where)


def _evidence_problem(evidence: Any) -> str | None:
    """``evidence`` is null or an object of numbers, bools, strings, nulls and lists of numbers."""
    if evidence is None:
        return None
    if not isinstance(evidence, dict):
        return f"evidence is {type(evidence).__name__}, expected an object or null"
    for key, value in evidence.items():
        plain = value is None or isinstance(value, (bool, str)) or _number(value)
        numbers = isinstance(value, list) and all(v is None or _number(v) for v in value)
        if not (plain or numbers):
            return f"evidence.{key} is {type(value).__name__}, expected a number, bool, string or list of numbers"
    return None


def _strip_problem(strip: Any, run_dir: Path, latent_id: Any) -> str | None:
    """An ok entry names its own strip: ``strips/<name>.png`` in the run directory, a regular file."""
    if not isinstance(strip, str) or not strip:
        return f"strip is {strip!r}, expected the relative path of its PNG"
    rel = Path(strip)
    if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != ("strips",):
        return f"strip {strip!r} is not a file under strips/ in the run directory"
    if isinstance(latent_id, str) and strip != f"strips/{strip_name(latent_id)}.png":
        return f"strip {strip!r} is not this latent's strip (strips/{strip_name(latent_id)}.png)"
    if os.path.islink(run_dir / "strips"):
        return "strips/ is a symbolic link"
    try:
        exists = safe_io.check_target(run_dir / rel)
    except UnsafePathError as exc:
        return f"its strip: {exc}"
    if not exists or os.lstat(run_dir / rel).st_size == 0:
        return f"its strip {strip} is missing or empty"
    return None


def entry_problems(entry: dict[str, Any], run_dir: str | Path, targets: Mapping[int, str] | None = None,
                   n_latents: int | None = None) -> list[str]:
    """Why a finished entry of results.json cannot be trusted on resume (empty when it can).

    Checks the keys this version knows (types and ranges, the strip on disk, the index among the
    run's ``targets`` and below ``n_latents``); unknown extra keys are accepted. A problem that
    starts with ``"not a latent of this run"`` marks a phantom entry (dropped, not recomputed).
    """
    problems: list[str] = []
    index = entry.get("index")
    if type(index) is not int or index < 0:
        return [f"index {index!r} is not an integer >= 0"]
    if n_latents is not None and index >= n_latents:
        return [f"{_PHANTOM}: index {index} is out of range (the model has {n_latents} latents)"]
    if targets is not None:
        if index not in targets:
            return [f"{_PHANTOM}: index {index} is not among the latents asked for"]
        if entry.get("id") != targets[index]:
            return [f"{_PHANTOM}: id {entry.get('id')!r} does not match latent {index} ({targets[index]!r})"]
    if entry.get("status") != "ok":
        problems.append(f"status is {entry.get('status')!r}, expected 'ok'")
    certainty = entry.get("certainty")
    if certainty is not None and not (_number(certainty) and 0.0 <= certainty <= 1.0):
        problems.append(f"certainty is {certainty!r}, expected a number in [0, 1]")
    if not isinstance(entry.get("clear"), bool):
        problems.append(f"clear is {entry.get('clear')!r}, expected true or false")
    explanation = entry.get("explanation")
    if explanation is not None and not isinstance(explanation, str):
        problems.append(f"explanation is {type(explanation).__name__}, expected a string or null")
    elif entry.get("clear") is True and not (explanation or "").strip():
        problems.append("clear is true but there is no explanation")
    if entry.get("error") is not None and not isinstance(entry["error"], str):
        problems.append(f"error is {type(entry['error']).__name__}, expected a string or null")
    responses = entry.get("responses")
    if not isinstance(responses, list):
        problems.append(f"responses is {type(responses).__name__}, expected a list")
    else:
        problems += [p for k, r in enumerate(responses) if (p := _response_problem(r, k))]
    timing = entry.get("timing")
    if timing is not None and not (isinstance(timing, dict) and all(_number(v) for v in timing.values())):
        problems.append("timing is not an object of numbers")
    for problem in (_evidence_problem(entry.get("evidence")), _usage_problem(entry.get("usage"), ""),
                    _strip_problem(entry.get("strip"), Path(run_dir), entry.get("id"))):
        if problem:
            problems.append(problem)
    return problems


def run_status(latents: list[dict[str, Any]], targets: Any = None) -> tuple[str, dict[str, int]]:
    """The final status of a run and its counts ``{ok, failed, skipped, missing}``.

    ``complete``: every latent (every one of ``targets`` when given) is ``ok``; ``failed``: not
    one is ok and some failed; ``incomplete``: anything else (some failed, skipped or missing).
    """
    counts = {s: sum(1 for e in latents if e.get("status") == s) for s in STATUSES}
    counts["missing"] = len(set(targets) - {e.get("index") for e in latents}) if targets is not None else 0
    if counts["failed"] == counts["skipped"] == counts["missing"] == 0:
        return "complete", counts
    if counts["ok"] == 0 and counts["failed"] > 0:
        return "failed", counts
    return "incomplete", counts


def _write_error(path: Path, exc: OSError, kept: int) -> RunStoreError:
    if isinstance(exc, UnsafePathError):
        return RunStoreError(str(exc))
    what = "disk full" if exc.errno in _NO_SPACE else f"cannot write ({exc.strerror or exc})"
    return RunStoreError(
        f"{what} while writing {path}: the {kept} latent(s) finished before are kept in results.json; "
        "free some space (or fix the directory), then run again with resume=True"
    )


class RunStore:
    """Owns one run directory while a run writes to it.

    ``settings`` identify the run; resuming into a directory made with other settings is
    refused unless ``force``. A lock keeps a second writer (process or store) out.

    ``targets`` (latent index -> id) and ``n_latents``, when given, are what a resumed entry is
    checked against (see :func:`entry_problems`); entries that fail are dropped (computed again)
    and the reasons are printed and kept in ``header["resume_notes"]``.
    """

    def __init__(self, out_dir: str | Path, header: dict[str, Any], settings: dict[str, Any],
                 resume: bool = False, force: bool = False, *, targets: Mapping[int, str] | None = None,
                 n_latents: int | None = None):
        self.dir = Path(out_dir)
        self.header = {k: v for k, v in header.items() if k != "resume_notes"}
        self.settings = _jsonable(settings)  # compared with the JSON read back, so normalise now
        self.targets = None if targets is None else sorted(targets)
        self._written = 0
        self._check_writable()
        self._lock()
        try:
            self._remove_temp_files()
            self.entries: dict[str, dict[str, Any]] = {}
            existing = self.dir / RESULTS
            try:  # a link or a FIFO at results.json is refused, --force or not (never read, never replaced)
                safe_io.check_target(existing)
            except UnsafePathError as exc:
                raise RunStoreError(str(exc)) from None
            if os.path.lexists(existing) and not force:
                try:
                    data = read_results(existing, check_entries=False)  # entries: checked one by one below
                except ValueError as exc:
                    raise RunStoreError(
                        f"{exc}. It cannot be resumed: use another output directory, or force=True to overwrite it"
                    ) from None
                if data.get("settings") != self.settings:
                    diff = _differences(data.get("settings") or {}, self.settings)
                    raise RunStoreError(
                        f"{self.dir} holds a run with other settings ({diff}); use another output directory, "
                        "or force=True to overwrite it"
                    )
                if not resume and data["latents"]:
                    raise RunStoreError(
                        f"{self.dir} already holds results of this run; pass resume=True to continue it or force=True to start over"
                    )
                self.entries, notes = self._checked_entries(data["latents"], targets, n_latents)
                if notes:
                    self.header["resume_notes"] = notes
                    for note in notes:
                        print(f"latentexplainer: resume: {note}", file=sys.stderr)
            self._flush("running")
        except BaseException:
            self.release()
            raise

    def _checked_entries(self, latents: list[dict[str, Any]], targets: Mapping[int, str] | None,
                         n_latents: int | None) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The finished (``ok``) entries worth keeping, and a note for each one that is not."""
        kept: dict[str, dict[str, Any]] = {}
        notes: list[str] = []
        seen: set[int] = set()
        for i, entry in enumerate(latents):
            frame = _frame_problem(entry, i)
            if frame:
                notes.append(f"{frame}: dropped")
                continue
            if entry["status"] != "ok":
                continue  # failed and skipped latents are computed again anyway
            problems = entry_problems(entry, self.dir, targets, n_latents)
            if not problems and (entry["index"] in seen or entry["id"] in kept):
                problems = ["a second entry for the same latent"]
            if problems:
                phantom = any(p.startswith(_PHANTOM) for p in problems)
                action = "dropped" if phantom else "computed again"
                notes.append(f"latent {entry['id']!r} (index {entry['index']}) {action}: {'; '.join(problems)}")
                continue
            kept[entry["id"]] = entry
            seen.add(entry["index"])
        return kept, notes

    # -- directory and lock --------------------------------------------------------------------
    def _check_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe", delete=True)
            probe.close()
        except OSError as exc:
            raise RunStoreError(f"output directory {self.dir} is not writable: {exc.strerror or exc}") from exc

    def _lock(self) -> None:
        key = str(self.dir.resolve())
        with _held_guard:
            if key in _held:
                raise RunStoreError(f"{self.dir} is in use by another run in this process; wait for it or use another output directory")
            _held.add(key)
        try:
            if fcntl is None or not self._flock():
                self._pid_lock()
        except BaseException:
            with _held_guard:
                _held.discard(key)
            raise
        self._key = key

    def _flock(self) -> bool:
        """Take the flock; False when the file system has no flock (then a pid file is used)."""
        path = self.dir / LOCK
        for _ in range(10):
            try:
                fd = safe_io.open_regular(path, os.O_RDWR | os.O_CREAT)
            except UnsafePathError as exc:
                raise RunStoreError(f"cannot lock {self.dir}: {exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunStoreError(
                        f"{self.dir} is in use by another run (process {holder}); wait for it or use another output directory"
                    ) from None
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return False
                raise RunStoreError(f"could not lock {self.dir}: {exc.strerror or exc}") from exc
            try:  # a run that released meanwhile unlinks the file: we must hold the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._lock_fd = fd
            return True
        raise RunStoreError(f"could not lock {self.dir}: the lock file keeps changing")

    def _pid_lock(self) -> None:
        lock = self.dir / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), safe_io.FILE_MODE)
            except FileExistsError:
                try:
                    pid = int(safe_io.read_text(lock).strip() or 0)
                except UnsafePathError as exc:
                    raise RunStoreError(f"cannot lock {self.dir}: {exc}") from None
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise RunStoreError(f"{self.dir} is in use by another run (process {pid}); wait for it or use another output directory") from None
                lock.unlink(missing_ok=True)  # stale lock of a process that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._lock_fd = None
            return
        raise RunStoreError(f"could not lock {self.dir}")

    def release(self) -> None:
        """Give the directory back (idempotent)."""
        key = getattr(self, "_key", None)
        if key is None:
            return
        (self.dir / LOCK).unlink(missing_ok=True)  # before unlocking: see _flock
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None
        with _held_guard:
            _held.discard(key)
        self._key = None

    def _remove_temp_files(self) -> None:
        """Temp files of a writer that was killed mid-write (only ours: '.NAME.*.tmp')."""
        patterns = [(self.dir, f".{RESULTS}.*.tmp"), (self.dir, ".report.html.*.tmp"), (self.dir, ".directions.safetensors.*.tmp"),
                    (self.dir / "strips", ".*.png.*.tmp"), (self.dir / "heatmaps", ".*.png.*.tmp")]
        for folder, pattern in patterns:
            if folder.is_dir() and not folder.is_symlink():
                for p in folder.glob(pattern):
                    p.unlink(missing_ok=True)

    # -- writing -------------------------------------------------------------------------------
    @property
    def done_ids(self) -> set[str]:
        return set(self.entries)

    def _flush(self, status: str) -> None:
        latents = sorted(self.entries.values(), key=lambda e: e["index"])
        header = {k: v for k, v in self.header.items() if k not in _RESERVED}
        counts = run_status(latents, self.targets)[1]
        data = {"schema_version": SCHEMA_VERSION} | header | {"settings": self.settings, "status": status, "counts": counts,
                                                             "latents": latents}
        path = self.dir / RESULTS
        data = _jsonable(data)
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (e.g. from a server's broken \ud83d escape): keep it, escaped
            text = json.dumps(data, indent=2, ensure_ascii=True, allow_nan=False) + "\n"
        try:
            atomic_write_text(path, text)
        except OSError as exc:
            raise _write_error(path, exc, self._written) from exc
        self._written = len(latents)

    def _save_strip(self, result: LatentResult) -> str:
        rel = f"strips/{strip_name(result.id)}.png"
        path = self.dir / rel
        try:
            safe_io.ensure_dir(path.parent)
            with safe_io.atomic_writer(path) as f:  # the temp file is removed on any failure
                grid(result.traversal).save(f, format="PNG")
        except OSError as exc:
            raise _write_error(path, exc, self._written) from exc
        return rel

    def write_error(self, path: str | Path, exc: OSError) -> RunStoreError:
        """The error to raise when writing a file of this run (a heat map, ...) failed with ``exc``."""
        return _write_error(Path(path), exc, self._written)

    def add(self, result: LatentResult, extras: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the strip of ``result``, then its entry in results.json (in that order)."""
        strip = self._save_strip(result) if result.traversal is not None else None
        core = result.to_json(strip)
        entry = _jsonable(core | (extras or {}) | {k: core[k] for k in _CORE if k in core})  # extras never replace these
        previous = self.entries.get(result.id)
        self.entries[result.id] = entry
        try:
            self._flush("running")
        except RunStoreError:
            if previous is None:  # keep memory equal to the file
                self.entries.pop(result.id, None)
            else:
                self.entries[result.id] = previous
            raise
        return entry

    def finish(self, status: str | None = None) -> dict[str, Any]:
        """Write the final status and release the directory (also when the write fails).

        ``status`` None: ``complete``, ``incomplete`` or ``failed`` from the entries (:func:`run_status`).
        """
        if status is None:
            status = run_status(list(self.entries.values()), self.targets)[0]
        elif status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        try:
            self._flush(status)
        finally:
            self.release()
        return read_results(self.dir / RESULTS)

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """Which settings differ, e.g. ``samples: 5 -> 3``."""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = []
    for k in keys[:limit]:
        a, b = json.dumps(old.get(k), sort_keys=True), json.dumps(new.get(k), sort_keys=True)
        if len(a) + len(b) > 120:
            parts.append(f"{k} differs")
        else:
            parts.append(f"{k}: {a} -> {b}")
    if len(keys) > limit:
        parts.append(f"{len(keys) - limit} more")
    return "; ".join(parts) or "unreadable settings"
