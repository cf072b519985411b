"""The run directory: results.json written atomically after every latent, strips/*.png, a run lock.

results.json is always valid JSON reflecting exactly the finished latents: each update writes a
temp file, fsyncs it and renames it over the old one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .report.strips import save_strip
from .results import SCHEMA_VERSION, LatentResult

RESULTS = "results.json"
LOCK = ".lock"


class RunStoreError(RuntimeError):
    """The run directory cannot be used (locked, settings differ, not writable)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_results(path: str | Path) -> dict[str, Any]:
    """Read and check a results.json; raises ValueError saying what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("latents"), list):
        raise ValueError(f"{path} is not a results file: expected an object with a 'latents' list")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {data.get('schema_version')!r}; this version reads {SCHEMA_VERSION}")
    for i, entry in enumerate(data["latents"]):
        if not isinstance(entry, dict) or not {"id", "index", "status"} <= set(entry):
            raise ValueError(f"{path}: latent entry {i} lacks id/index/status")
        if entry["status"] not in ("ok", "failed", "skipped"):
            raise ValueError(f"{path}: latent {entry['id']!r} has unknown status {entry['status']!r}")
    return data


class RunStore:
    """Owns one run directory while a run writes to it.

    ``settings`` identify the run; resuming into a directory made with other settings is
    refused unless ``force``. A lock file keeps a second process out.
    """

    def __init__(self, out_dir: str | Path, header: dict[str, Any], settings: dict[str, Any],
                 resume: bool = False, force: bool = False):
        self.dir = Path(out_dir)
        self.header, self.settings = header, settings
        self._check_writable()
        self._lock()
        try:
            self.entries: dict[str, dict[str, Any]] = {}
            existing = self.dir / RESULTS
            if existing.exists() and not force:
                data = read_results(existing)
                if data.get("settings") != settings:
                    raise RunStoreError(
                        f"{self.dir} holds a run with other settings; use another --out directory, or --force to overwrite it"
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

    def _check_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.dir, prefix=".probe", delete=True)
            probe.close()
        except OSError as exc:
            raise RunStoreError(f"output directory {self.dir} is not writable: {exc.strerror or exc}") from exc

    def _lock(self) -> None:
        lock = self.dir / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid) and pid != os.getpid():
                    raise RunStoreError(f"{self.dir} is in use by another run (process {pid}); wait for it or use another --out") from None
                lock.unlink(missing_ok=True)  # stale lock of a process that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._locked = True
            return
        raise RunStoreError(f"could not lock {self.dir}")

    def release(self) -> None:
        if getattr(self, "_locked", False):
            (self.dir / LOCK).unlink(missing_ok=True)
            self._locked = False

    @property
    def done_ids(self) -> set[str]:
        return set(self.entries)

    def _flush(self, status: str) -> None:
        latents = sorted(self.entries.values(), key=lambda e: e["index"])
        data = {"schema_version": SCHEMA_VERSION} | self.header | {"settings": self.settings, "status": status, "latents": latents}
        try:
            atomic_write_text(self.dir / RESULTS, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise RunStoreError(f"disk full while writing {self.dir / RESULTS}; finished latents are kept, free space and --resume") from exc
            raise

    def add(self, result: LatentResult, extras: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the strip of ``result``, then its entry in results.json (in that order)."""
        strip = None
        if result.traversal is not None:
            rel = f"strips/{result.id}.png"
            save_strip(result.traversal, self.dir / rel)
            strip = rel
        entry = result.to_json(strip) | (extras or {})
        self.entries[result.id] = entry
        self._flush("running")
        return entry

    def finish(self, status: str = "complete") -> dict[str, Any]:
        self._flush(status)
        self.release()
        return read_results(self.dir / RESULTS)
