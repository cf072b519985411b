"""The run directory: results.json written atomically after every latent, strips/*.png, a run lock.

results.json is always valid JSON reflecting exactly the finished latents: each update writes a
temp file, fsyncs it and renames it over the old one. A strip is written (the same way) before
the entry that names it, so an entry never points at a missing or half-written PNG.

The lock is an ``flock`` on ``RUN/.lock`` where the OS has it (released by the kernel when the
process dies, however it dies), else a pid file whose process must still be alive. Locks held by
this process are tracked too, so two stores in one process cannot share a directory either.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

from .report.strips import save_strip
from .results import SCHEMA_VERSION, LatentResult

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: pid-file lock
    fcntl = None  # type: ignore[assignment]

RESULTS = "results.json"
LOCK = ".lock"
STATUSES = ("ok", "failed", "skipped")
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

_CORE = ("id", "index", "status", "explanation", "certainty", "clear", "responses", "strip", "error")
_RESERVED = ("schema_version", "settings", "status", "latents")  # header keys the store writes itself
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

_held: set[str] = set()  # run directories locked by this process
_held_guard = threading.Lock()


class RunStoreError(RuntimeError):
    """The run directory cannot be used (locked, settings differ, not writable, disk full)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a partial one.

    The new file gets the old file's permissions, or the usual ones (0666 less the umask) for a
    new file, not mkstemp's private 0600.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_results(path: str | Path) -> dict[str, Any]:
    """Read and check a results.json; raises ValueError (only) saying what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("latents"), list):
        raise ValueError(f"{path} is not a results file: expected an object with a 'latents' list")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {version!r}; this version reads {SCHEMA_VERSION}")
    for i, entry in enumerate(data["latents"]):
        if not isinstance(entry, dict) or not {"id", "index", "status"} <= set(entry):
            raise ValueError(f"{path}: latent entry {i} lacks id/index/status")
        if not isinstance(entry["id"], str) or not entry["id"]:
            raise ValueError(f"{path}: latent entry {i} has id {entry['id']!r}; expected a non-empty string")
        if type(entry["index"]) is not int or entry["index"] < 0:
            raise ValueError(f"{path}: latent {entry['id']!r} has index {entry['index']!r}; expected an integer >= 0")
        if not isinstance(entry["status"], str) or entry["status"] not in STATUSES:
            raise ValueError(f"{path}: latent {entry['id']!r} has unknown status {entry['status']!r}")
    if "settings" in data and not isinstance(data["settings"], dict):
        raise ValueError(f"{path}: 'settings' must be an object")
    return data


def _write_error(path: Path, exc: OSError, kept: int) -> RunStoreError:
    what = "disk full" if exc.errno in _NO_SPACE else f"cannot write ({exc.strerror or exc})"
    return RunStoreError(
        f"{what} while writing {path}: the {kept} latent(s) finished before are kept in results.json; "
        "free some space (or fix the directory), then rerun the same command with --resume"
    )


class RunStore:
    """Owns one run directory while a run writes to it.

    ``settings`` identify the run; resuming into a directory made with other settings is
    refused unless ``force``. A lock keeps a second writer (process or store) out.
    """

    def __init__(self, out_dir: str | Path, header: dict[str, Any], settings: dict[str, Any],
                 resume: bool = False, force: bool = False):
        self.dir = Path(out_dir)
        self.header = dict(header)
        self.settings = _jsonable(settings)  # compared with the JSON read back, so normalise now
        self._written = 0
        self._check_writable()
        self._lock()
        try:
            self._remove_temp_files()
            self.entries: dict[str, dict[str, Any]] = {}
            existing = self.dir / RESULTS
            if existing.exists() and not force:
                try:
                    data = read_results(existing)
                except ValueError as exc:
                    raise RunStoreError(
                        f"{exc}. It cannot be resumed: use another --out directory, or --force to overwrite it"
                    ) from None
                if data.get("settings") != self.settings:
                    diff = _differences(data.get("settings") or {}, self.settings)
                    raise RunStoreError(
                        f"{self.dir} holds a run with other settings ({diff}); use another --out directory, "
                        "or --force to overwrite it"
                    )
                if not resume and data["latents"]:
                    raise RunStoreError(
                        f"{self.dir} already holds results of this run; pass --resume to continue it or --force to start over"
                    )
                self.entries = {e["id"]: e for e in data["latents"] if e["status"] == "ok"}
            self._flush("running")
        except BaseException:
            self.release()
            raise

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
                raise RunStoreError(f"{self.dir} is in use by another run in this process; wait for it or use another --out")
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
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunStoreError(
                        f"{self.dir} is in use by another run (process {holder}); wait for it or use another --out"
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
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _pid_alive(pid):
                    raise RunStoreError(f"{self.dir} is in use by another run (process {pid}); wait for it or use another --out") from None
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
        patterns = [(self.dir, f".{RESULTS}.*.tmp"), (self.dir, ".report.html.*.tmp"), (self.dir / "strips", ".*.png.*.tmp")]
        for folder, pattern in patterns:
            if folder.is_dir():
                for p in folder.glob(pattern):
                    p.unlink(missing_ok=True)

    # -- writing -------------------------------------------------------------------------------
    @property
    def done_ids(self) -> set[str]:
        return set(self.entries)

    def _flush(self, status: str) -> None:
        latents = sorted(self.entries.values(), key=lambda e: e["index"])
        header = {k: v for k, v in self.header.items() if k not in _RESERVED}
        data = {"schema_version": SCHEMA_VERSION} | header | {"settings": self.settings, "status": status, "latents": latents}
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
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_strip(result.traversal, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _write_error(path, exc, self._written) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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

    def finish(self, status: str = "complete") -> dict[str, Any]:
        """Write the final status and release the directory (also when the write fails)."""
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
