"""What every explainer backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from ..types import Prompt, Response, Traversal


class BackendError(RuntimeError):
    """A backend could not produce any answer (bad configuration, unreachable server, ...)."""


class Backend(ABC):
    """Explains a traversal: returns ``n`` :class:`Response` objects, one per sample.

    Capabilities are class attributes so the caller can plan before any call is made. A failed
    sample is a ``Response(text=None, error=...)``; never invent text for it.
    """

    name: ClassVar[str] = "backend"
    supports_images: ClassVar[bool] = True
    supports_n: ClassVar[bool] = True  # can return n samples from one request
    needs_key: ClassVar[bool] = False
    # True when the backend draws its n samples from n different base latents of the traversal
    # (so the traversal must be built with at least n bases) instead of resampling one prompt.
    samples_from_bases: ClassVar[bool] = False

    @abstractmethod
    def explain(self, traversal: Traversal, prompt: Prompt, n: int) -> list[Response]:
        """Return exactly ``n`` responses for ``traversal`` (see ``OfflineBackend`` for a reference)."""
        raise NotImplementedError(
            f"{type(self).__name__}.explain(traversal, prompt, n) must return n Response objects; "
            "see latentexplainer_plugin.backends.offline.OfflineBackend for a reference implementation"
        )

    def describe(self) -> dict:
        """Settings worth recording in results.json (never secrets)."""
        return {"name": self.name}

    def explain_many(self, jobs: list[tuple[Traversal, Prompt, int]]) -> list[list[Response] | BaseException]:
        """Explain several traversals; one entry per job, an exception object where a job failed.

        The default runs jobs one after another; network backends override it to run them
        concurrently. One job failing never loses the others.
        """
        out: list[list[Response] | BaseException] = []
        for traversal, prompt, n in jobs:
            try:
                out.append(self.explain(traversal, prompt, n))
            except Exception as exc:  # reported per latent by the caller
                out.append(exc)
        return out
