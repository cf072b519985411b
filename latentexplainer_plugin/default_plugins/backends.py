"""Built-in explainer backends.

Backends that call a language model (``openai``, ``hf``) come wrapped in a
:class:`~latentexplainer_plugin.cache.CachedBackend` (options ``cache_dir`` and ``no_cache``);
the offline explainer is deterministic and cheap, so it is never cached. Each factory carries its
backend class's declarations (``Options``, ``capabilities``, ``preflight``), exactly as a
third-party factory would.
"""

from ..hookspecs import hookimpl


def _declared(backend_class):
    """Give a factory function the declarations of the class it builds."""

    def mark(factory):
        factory.Options = backend_class.Options
        factory.capabilities = backend_class.capabilities
        factory.preflight = backend_class.preflight
        factory.backend_class = backend_class
        return factory

    return mark


def _cached(backend, cache_dir=None, no_cache=False):
    from ..cache import CachedBackend, ResponseCache

    return CachedBackend(backend, ResponseCache(cache_dir, enabled=not no_cache))


def _offline_factory():
    from ..backends.offline import OfflineBackend

    @_declared(OfflineBackend)
    def offline(arg=None, **options):
        return OfflineBackend(**options)

    return offline


def _openai_factory():
    from ..backends.openai_compat import OpenAICompatBackend

    @_declared(OpenAICompatBackend)
    def openai(arg=None, *, cache_dir=None, no_cache=False, max_new_tokens=None, **options):
        """``openai:MODEL``; options: see ``latentexplainer plugins --options openai``."""
        if arg is None or not str(arg).strip():
            raise ValueError("the openai backend needs a model name: openai:MODEL (e.g. openai:gpt-4o)")
        if max_new_tokens is not None:
            options.setdefault("max_tokens", max_new_tokens)
        options = {k: v for k, v in options.items() if v is not None}
        return _cached(OpenAICompatBackend(model=str(arg).strip(), **options), cache_dir, no_cache)

    return openai


def _hf_factory():
    from ..backends.hf import HFBackend

    @_declared(HFBackend)
    def hf(arg=None, *, cache_dir=None, no_cache=False, **options):
        """``hf:PATH_OR_HUB_ID``; options: see ``latentexplainer plugins --options hf``."""
        if arg is None or not str(arg).strip():
            raise ValueError("the hf backend needs a model directory or hub id: hf:PATH_OR_ID")
        options = {k: v for k, v in options.items() if v is not None}
        return _cached(HFBackend(str(arg).strip(), **options), cache_dir, no_cache)

    return hf


@hookimpl
def latentexplainer_register_backends(register):
    register("offline", _offline_factory())
    register("openai", _openai_factory())
    register("hf", _hf_factory())
