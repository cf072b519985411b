"""Every error the library raises on purpose derives from :class:`LatentExplainerError`.

Each class also keeps the built-in base that callers caught before (``ValueError`` for bad
input, ``RuntimeError`` for a backend or run directory that cannot be used, ``OSError`` for an
unsafe path), so ``except ValueError`` keeps working. Messages speak in library words (argument
and option names); the command line maps them to its flags.
"""

from __future__ import annotations

import errno
from pathlib import Path


class LatentExplainerError(Exception):
    """Base of every error raised by latentexplainer_plugin on purpose (not a bug)."""


class UsageError(LatentExplainerError):
    """Bad command-line input, found before any expensive work."""


class OptionError(LatentExplainerError, ValueError):
    """Options a component refuses: ``problems`` is a list of ``(option, message)``.

    A message either follows the option's name ("must be >= 1, got 0") or is a whole sentence
    that names the option through ``{flag}`` ("... choose another variable with {flag}NAME").
    :meth:`render` writes it in library words (``steps``, ``api_key_env=``); the command line
    passes its own ``name_of`` to speak of flags (``--steps``, ``--api-key-env ``).
    """

    def __init__(self, owner: str, problems: list[tuple[str, str]]):
        self.owner, self.problems = owner, list(problems)
        super().__init__(self.render())

    def render(self, name_of=None, with_owner: bool = True) -> str:
        parts = []
        for option, message in self.problems:
            if "{flag}" in message:
                parts.append(message.replace("{flag}", name_of(option, True) if name_of else f"{option} "))
            else:
                parts.append(f"{name_of(option, False) if name_of else option} {message}")
        text = "; ".join(parts)
        return f"{self.owner}: {text}" if with_owner and self.owner else text


class UnknownComponentError(LatentExplainerError, ValueError):
    """A name that no plugin registered; the message lists the registered names."""


class PluginError(LatentExplainerError, ValueError):
    """A third-party plugin's factory failed; the message names the plugin and its distribution."""


class SiteError(LatentExplainerError, ValueError):
    """A module path that is not in the model; the message names the closest valid paths."""


class EditError(LatentExplainerError, ValueError):
    """An edit that does not fit the activation it is applied to (shape, index, NaN/inf)."""


class NonFiniteImagesError(LatentExplainerError, ValueError):
    """The traversal images contain NaN or inf (NaN weights, or strengths too large for the model)."""


class TemplateError(LatentExplainerError, ValueError):
    """A template written by the LLM that cannot be used (the message says why)."""


class LoadError(LatentExplainerError, ValueError):
    """A model, weights or data file could not be read; the message says which and why."""


class BackendError(LatentExplainerError, RuntimeError):
    """A backend could not produce any answer (bad configuration, unreachable server, ...)."""


class FatalBackendError(BackendError):
    """An error that every further request would repeat (bad key, wrong URL or model, a request the
    server always rejects): ``explain_many`` raises it instead of recording it per latent, so the
    run stops at once (the CLI exits with code 2; finished latents are kept)."""


class SAEError(LatentExplainerError, ValueError):
    """An SAE that cannot be used: unreadable files, bad weights, or a site it does not fit."""


class VLMError(LatentExplainerError, ValueError):
    """A bad demo-VLM setting or directory; the message says what was wrong and what is allowed."""


class CaptionError(LatentExplainerError, ValueError):
    """Factors that cannot be captioned (wrong shape, unknown shape index) or words outside the vocabulary."""


class UnsupportedPipelineError(LatentExplainerError, ValueError):
    """A pipeline directory whose ``_class_name`` no built-in adapter explains."""


class SAEMetricsError(LatentExplainerError, ValueError):
    """Activations that cannot be scored (empty, wrong width, non-finite)."""


class ExamplesError(LatentExplainerError, ValueError):
    """Bad settings for example selection, or images / maps that do not fit together."""


class CollectError(LatentExplainerError, ValueError):
    """Bad collection settings, an activation that cannot be collected, or an unreadable collection."""


class SAETrainError(LatentExplainerError, ValueError):
    """Bad training settings or data, or the training library is missing."""


class RunStoreError(LatentExplainerError, RuntimeError):
    """The run directory cannot be used (locked, settings differ, not writable, disk full)."""


class UnsafePathError(LatentExplainerError, OSError):
    """A link or a special file stands where the project writes (or reads back) its own file."""

    def __init__(self, path: str | Path, what: str):
        message = (f"{path} is {what}, not a regular file; refusing to write or read through it. "
                   "Remove it (or choose another output or cache directory) and run again")
        OSError.__init__(self, errno.ELOOP if what == "a symbolic link" else errno.EINVAL, message)
        self.filename = str(path)

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)
