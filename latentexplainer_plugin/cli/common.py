"""Shared pieces of the commands: number parsing, limits, stdout that survives a closed pipe, crash reports."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from ..errors import UsageError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL_ERROR = 3


def _parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    return values


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated integers, got {text!r}") from None


def check_device(device: str) -> str:
    from ..devices import check_device as check

    try:
        return check(device, flag="--device")
    except ValueError as exc:
        raise UsageError(in_flag_words(str(exc))) from None


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a job scheduler, `kill`) ends a run like Ctrl-C: marked, resumable


#: Integer options -> (lowest, highest) allowed (None: checked by the command, with its own message).
#: Upper bounds keep absurd values (``--seed 2**70``, ``--samples 10**9``) from overflowing or running forever.
INT_LIMITS: dict[str, tuple[int | None, int | None]] = {
    "seed": (0, 2**63 - 1), "samples": (None, 1000), "n": (None, 1_000_000), "latents": (None, 4096),
    "batch_size": (None, 65536), "steps": (None, 10_000_000), "n_directions": (None, 4096), "top_k": (None, 1_000_000),
    "concurrency": (None, 1024), "max_retries": (None, 100), "max_new_tokens": (None, 1_000_000),
    "max_images": (None, 10_000_000), "threads": (None, 1024),
}
INT_DEFAULT_LIMITS = (-(2**31 - 1), 2**31 - 1)


def check_out(args: argparse.Namespace) -> None:
    """``--out ''`` (or only spaces) would silently mean the current directory: refuse it."""
    out = getattr(args, "out", None)
    if out is not None and not str(out).strip():
        raise UsageError(f"--out {out!r} is empty; give the path to write to, e.g. --out runs/demo")


def check_int_limits(args: argparse.Namespace) -> None:
    """Refuse integer options outside the range this program can handle (see :data:`INT_LIMITS`)."""
    for dest, value in vars(args).items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        lo, hi = INT_LIMITS.get(dest, INT_DEFAULT_LIMITS)
        flag = "--" + dest.replace("_", "-")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = f"an integer in [{lo}, {hi}]" if lo is not None else f"at most {hi}"
            raise UsageError(f"{flag} must be {allowed}, got {value}")


class _PipeSafeStdout:
    """Wraps stdout: once the reader has gone (``latentexplainer plugins | head -1``), further output
    is dropped instead of raising BrokenPipeError, so the command ends quietly with its own exit code."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._broken = False

    def _drop(self) -> None:
        self._broken = True
        try:  # the interpreter flushes the real stdout at exit: send what is buffered to /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # not a real file (captured by a test harness)

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Plugin warnings as one plain line on stderr (no source location: it is not the user's code), in flag words."""
    print(f"latentexplainer: warning: {in_flag_words(str(message))}", file=sys.stderr)


def _internal_error(command: str, exc: BaseException, args: argparse.Namespace | None = None) -> int:
    """A bug, not bad input: one line on stderr, the full traceback in a file, exit code 3."""
    import tempfile
    import traceback

    import re

    secrets = [v for v in (os.environ.get(n, "") for n in {"OPENAI_API_KEY", getattr(args, "api_key_env", None) or ""} if n)
               if len(v) >= 8]

    def scrub(text: str) -> str:  # credentials in URLs and the API key never reach the screen or the file
        text = re.sub(r"(\w+://)[^/\s@:]+:[^/\s@]*@", r"\1***@", text)
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    summary = scrub(str(exc).strip().splitlines()[0][:300]) if str(exc).strip() else ""
    where = "could not be written"
    try:
        fd, path = tempfile.mkstemp(prefix="latentexplainer-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(scrub(f"latentexplainer {command}: {' '.join(sys.argv[1:])}\n\n"))
            f.write(scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
        where = f"written to {path}"
    except OSError:
        pass
    cause = ("This looks like a problem of this machine (disk, memory, permissions), not of your input"
             if isinstance(exc, (OSError, MemoryError)) else "This is a bug in latentexplainer, not in your input")
    print(f"latentexplainer {command}: internal error: {type(exc).__name__}{': ' + summary if summary else ''}\n"
          f"{cause}; the full traceback was {where} (please attach it to a bug report).", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


#: Library words for the run's settings -> the flags that set them (library messages speak in the
#: first, the command line prints the second). Longer phrases first.
FLAG_WORDS = (
    ("run again with resume=True", "rerun the same command with --resume"),
    ("another output directory", "another --out directory"),
    ("resume=True", "--resume"),
    ("force=True", "--force"),
    ("labelled data (data=): a dict in the npz layout", "labelled data (--data): an npz"),
    ("pass latent_dim=N", "pass --latent-dim N"),
    ("allow_pickle=True", "--allow-pickle"),
    ("no_cache=True", "--no-cache"),
    ("try more steps=, a longer warmup_steps=, a smaller beta_norm= (or beta=), recon_scale=2 (weighs reconstruction "
     "more), more free_bits= or a later free_bits_steps= (Kingma et al. 2016), or capacity=25 (Burgess et al. 2018)",
     "try more --steps, a longer --warmup-steps, a smaller --beta-norm (or --beta), --recon-scale 2 (weighs "
     "reconstruction more), more --free-bits or a later --free-bits-steps (Kingma et al. 2016), or --capacity 25 "
     "(Burgess et al. 2018)"),
)

#: Keyword arguments that library messages write as ``name=VALUE`` (or ``name=`` alone) -> the flag
#: that sets them: ``model='x/y'`` -> ``--model x/y``, ``max_new_tokens=`` -> ``--max-new-tokens``.
KEYWORD_FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "model", "adapter", "backend", "bias", "similarity", "device", "base_url", "api_key_env", "max_new_tokens",
    "cache_dir", "sae")}

# name=VALUE at the start or after a space or " (" (never inside a call such as ``torch.load(weights_only=True)``,
# nor after ``-o `` where the command line already speaks). VALUE is quoted, a number, an upper-case placeholder
# (NAME, DIR) or nothing, so a server's own words ("model=gpt-4o not found") are left as they are.
_KEYWORD = re.compile(r"(?:^|(?<=\s)|(?<=\s\()|(?<=^\())(?<!-o )(" + "|".join(sorted(KEYWORD_FLAGS, key=len, reverse=True))
                      + r")=(\"[^\"]*\"|'[^']*'|\d+(?:\.\d+)?\b|[A-Z][A-Z_]*\b|(?=[\s,;).]|$))")


def _keyword_as_flag(match: re.Match) -> str:
    flag, value = KEYWORD_FLAGS[match.group(1)], match.group(2)
    if value[:1] in ("'", '"'):
        value = value[1:-1]
    return f"{flag} {value}" if value else flag


def in_flag_words(text: str) -> str:
    """A library message as the command line says it (see :data:`FLAG_WORDS` and :data:`KEYWORD_FLAGS`)."""
    for library, flag in FLAG_WORDS:
        text = text.replace(library, flag)
    return _KEYWORD.sub(_keyword_as_flag, text)
