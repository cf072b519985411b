"""The ``latentexplainer`` command line: demo, explain, train-vae, train-demo, make-data, evaluate, calibrate, plugins.

Exit codes: 0 every latent has a result; 1 some latents failed; 2 bad input (nothing was run);
130 interrupted (finished latents are kept; rerun with --resume); 3 internal error (a bug: the
traceback is written to a file whose path is printed).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from .common import (EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, _internal_error, _PipeSafeStdout, in_flag_words,
                     _show_warning, _terminate, check_int_limits, check_out)
from .data import cmd_make_data
from .evaluate import cmd_calibrate, cmd_evaluate
from .explain import cmd_demo, cmd_explain
from .parser import build_parser
from .plugins import cmd_plugins
from .train import cmd_train_demo, cmd_train_vae
from .sae import cmd_sae_train
from .vlm import cmd_demo_vlm, cmd_train_demo_vlm

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_INTERNAL_ERROR", "EXIT_INTERRUPTED", "UsageError", "build_parser", "main"]

COMMANDS = {"demo": cmd_demo, "explain": cmd_explain, "train-vae": cmd_train_vae, "train-demo": cmd_train_demo, "train-demo-vlm": cmd_train_demo_vlm,
            "demo-vlm": cmd_demo_vlm,
            "make-data": cmd_make_data, "sae-train": cmd_sae_train, "plugins": cmd_plugins, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    from ..backends.base import BackendError, FatalBackendError
    from ..plugins import PluginWarning
    from ..safe_load import LoadError
    from ..store import RunStoreError

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    real_stdout, stdout = sys.stdout, _PipeSafeStdout(sys.stdout)
    sys.stdout = stdout  # type: ignore[assignment]
    warning_state = warnings.catch_warnings()
    warning_state.__enter__()
    default_show = warnings.showwarning
    warnings.showwarning = lambda m, c, *a, **k: (_show_warning if issubclass(c, PluginWarning) else default_show)(
        in_flag_words(str(m)), c, *a, **k)
    try:
        check_int_limits(args)
        check_out(args)
        return COMMANDS[args.command](args)
    except (UsageError, LoadError, RunStoreError, BackendError) as exc:
        print(f"latentexplainer {args.command}: error: {in_flag_words(str(exc))}", file=sys.stderr)
        out = getattr(args, "out", None)
        if isinstance(exc, FatalBackendError) and out and (Path(out) / "results.json").is_file():
            print(f"Finished latents are saved in {out}; fix the cause, then rerun the same command with --resume.",
                  file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        started = bool(out) and (Path(out) / "results.json").is_file()  # else it stopped before the run began
        hint = f" Finished latents are saved in {out}; rerun the same command with --resume to continue." if started else ""
        print(f"\nlatentexplainer {args.command}: interrupted.{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: summarise, keep the traceback, exit 3
        return _internal_error(args.command, exc, args)
    finally:
        stdout.flush()
        sys.stdout = real_stdout
        warning_state.__exit__(None, None, None)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
