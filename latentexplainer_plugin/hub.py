"""Deciding in seconds whether a model hub id can be loaded (transformers and diffusers retry for minutes)."""

from __future__ import annotations

import os

#: Seconds to wait for the model hub before a hub id is given up on.
HUB_TIMEOUT = 5.0


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (now, or when huggingface_hub was imported)."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_problem(model_id: str, filename: str | tuple[str, ...] = "config.json", timeout: float = HUB_TIMEOUT) -> str | None:
    """Why hub id ``model_id`` cannot be loaded, or None if it may be.

    None when ``filename`` (or one of several) of the model is in the local hub cache (no network is used), or when the
    hub answers about the model. Otherwise one request with a ``timeout`` decides: the hub is
    offline (``HF_HUB_OFFLINE``), unreachable, or has no such model. Other hub answers (a mirror that
    does not serve the API, a gated model) are left to ``from_pretrained``, which says what it needs.
    The phrase returned follows the id: ``f"{model_id} {problem}"``.
    """
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    except ImportError:  # transformers and diffusers need huggingface_hub; nothing to check without it
        return None
    for name in (filename,) if isinstance(filename, str) else filename:
        try:
            cached = try_to_load_from_cache(model_id, name)
        except Exception:  # noqa: BLE001 - an id the hub would refuse: from_pretrained words that error
            return None
        if isinstance(cached, str):
            return None
    if hub_offline():
        return (f"cannot be loaded from the hub or its local cache: it is not a local directory, not in the local hub cache "
                f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        HfApi(endpoint=endpoint).model_info(model_id, timeout=timeout)
    except RepositoryNotFoundError:
        return (f"cannot be loaded from the hub or its local cache: it is not a local directory, and the hub at {endpoint} "
                "has no such model (or it is private: log in with `hf auth login`)")
    except HfHubHTTPError:
        return None
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, timeout, proxy: the hub is unreachable
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return (f"cannot be loaded from the hub or its local cache: it is not a local directory, not in the local hub cache, "
                f"and the hub at {endpoint} cannot be reached ({reason})")
    return None
