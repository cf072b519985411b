"""What every explainer backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from ..errors import BackendError, FatalBackendError  # noqa: F401 (re-exported)
from ..options import ComponentOptions
from ..types import ExampleSet, Prompt, Response, Traversal


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
    #: The keyword options the registered factory accepts (see :mod:`latentexplainer_plugin.options`).
    Options: ClassVar[type[ComponentOptions]] = ComponentOptions
    #: What it can do, as words (built from the flags above plus ``extra_capabilities``).
    capabilities: ClassVar[frozenset[str]] = frozenset()
    extra_capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        flags = {"supports_images": cls.supports_images, "supports_n": cls.supports_n, "needs_key": cls.needs_key}
        cls.capabilities = frozenset(k for k, v in flags.items() if v) | frozenset(cls.extra_capabilities)

    @classmethod
    def preflight(cls, arg: str | None, options: dict[str, Any]) -> None:
        """Checks that need neither the model nor a request (a key is set, the server answers a
        TCP connect, a model directory is complete); raise :class:`~latentexplainer_plugin.errors.OptionError`
        or :class:`BackendError`. Called before anything expensive; ``options`` are the validated
        options given (defaults not filled in)."""

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

    def explain_examples(self, examples: ExampleSet, prompt: Prompt, n: int) -> list[Response]:
        """Return exactly ``n`` responses for a feature's example set (``prompt`` from
        :func:`~latentexplainer_plugin.biases.examples.build_example_prompt`).

        The default sends the prompt (its text and grid image) through :meth:`explain`, with the
        activating images as a one-row traversal: right for backends that answer from the prompt
        alone (chat models: OpenAI-compatible, hf). A wrapper that keeps the real backend in
        ``.backend`` (the response cache) hands the call on when that backend has its own method.
        A backend that reads the traversal's images itself (``samples_from_bases``) must override
        this method (see ``OfflineBackend.explain_examples``).
        """
        inner = getattr(self, "backend", None)
        if isinstance(inner, Backend) and type(inner).explain_examples is not Backend.explain_examples:
            return inner.explain_examples(examples, prompt, n)
        if self.samples_from_bases or (isinstance(inner, Backend) and inner.samples_from_bases):
            raise BackendError(
                f"{type(self).__name__} reads the traversal images, not the prompt, so it cannot answer an example "
                "set through explain(); implement explain_examples(examples, prompt, n) (see "
                "latentexplainer_plugin.backends.offline.OfflineBackend.explain_examples)")
        return self.explain(examples.as_traversal(), prompt, n)

    def explain_many(
        self,
        jobs: list[tuple[Traversal, Prompt, int]],
        on_response: Callable[[int, int, Response], None] | None = None,
    ) -> list[list[Response] | BaseException]:
        """Explain several traversals; one entry per job, an exception object where a job failed.

        The default runs jobs one after another; network backends override it to run them
        concurrently. One job failing never loses the others; a :class:`FatalBackendError` stops
        them all (it is raised, not returned).

        ``on_response(job, sample, response)``, when given, is called with each answer as soon as
        it arrives (the response cache stores it at once, so an interruption loses no paid answer).
        """
        out: list[list[Response] | BaseException] = []
        for j, (traversal, prompt, n) in enumerate(jobs):
            try:
                answers = self.explain(traversal, prompt, n)
            except FatalBackendError:
                raise
            except Exception as exc:  # reported per latent by the caller
                out.append(exc)
                continue
            if on_response is not None:
                for i, response in enumerate(answers):
                    on_response(j, i, response)
            out.append(answers)
        return out
