"""Built-in explainer backends.

Backends that call a language model (``openai``, ``hf``) come wrapped in a
:class:`~latentexplainer_plugin.cache.CachedBackend` (options ``cache_dir`` and ``no_cache``);
the offline explainer is deterministic and cheap, so it is never cached (it accepts and ignores
the two cache options, so callers can pass them to any built-in backend).
"""

from ..hookspecs import hookimpl

_CACHE_OPTIONS = ("cache_dir", "no_cache")


def _cached(backend, cache_dir=None, no_cache=False):
    from ..cache import CachedBackend, ResponseCache

    return CachedBackend(backend, ResponseCache(cache_dir, enabled=not no_cache))


def _offline(arg=None, **options):
    from ..backends.offline import OfflineBackend

    for key in _CACHE_OPTIONS:  # deterministic and cheap: never cached
        options.pop(key, None)
    return OfflineBackend(**options)


def _openai(arg=None, *, cache_dir=None, no_cache=False, **options):
    """``openai:MODEL``; options: base_url, api_key_env, timeout, concurrency, max_retries,
    temperature, max_tokens (alias max_new_tokens), cache_dir, no_cache."""
    from ..backends.openai_compat import OpenAICompatBackend

    if arg is None or not str(arg).strip():
        raise ValueError("the openai backend needs a model name: --backend openai:MODEL (e.g. openai:gpt-4o)")
    if "max_new_tokens" in options:
        value = options.pop("max_new_tokens")
        if value is not None:
            options.setdefault("max_tokens", value)
    options = {k: v for k, v in options.items() if v is not None}
    return _cached(OpenAICompatBackend(model=str(arg).strip(), **options), cache_dir, no_cache)


def _hf(arg=None, *, cache_dir=None, no_cache=False, **options):
    """``hf:PATH_OR_HUB_ID``; options: device, dtype, max_new_tokens, min_new_tokens, temperature,
    top_p, max_image_side, cache_dir, no_cache."""
    from ..backends.hf import HFBackend

    if arg is None or not str(arg).strip():
        raise ValueError("the hf backend needs a model directory or hub id: --backend hf:PATH_OR_ID")
    options = {k: v for k, v in options.items() if v is not None}
    return _cached(HFBackend(str(arg).strip(), **options), cache_dir, no_cache)


@hookimpl
def latentexplainer_register_backends(register):
    register("offline", _offline)
    register("openai", _openai)
    register("hf", _hf)
