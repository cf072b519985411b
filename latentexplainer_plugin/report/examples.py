"""``examples/<id>.png``: the example-set image an SAE feature's explainer was shown.

Pass :class:`ExamplesWriter` (alone or with other writers) as ``extras`` to
``run.explain_to_dir``: for each latent with example evidence (``LatentResult.example_evidence``)
it writes the prompt's grid image and returns the latent's ``examples`` record with ``image`` set.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .heatmaps import safe_name

EXAMPLES_DIR = "examples"


class ExamplesWriter:
    """Writes ``examples/<id>.png`` for each finished latent that has example evidence; returns
    ``{"examples": record | {"image": path}}`` (nothing for other latents). An image that cannot
    be written never fails the run: the record keeps ``image: None`` and a warning says why."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)

    def __call__(self, result: Any) -> dict[str, Any]:
        record = (getattr(result, "extras", None) or {}).get("examples")
        evidence = getattr(result, "example_evidence", None)
        if not isinstance(record, dict):
            return {}
        if evidence is None:
            return {"examples": record | {"image": None}}
        from ..safe_io import atomic_writer, ensure_dir

        rel = f"{EXAMPLES_DIR}/{safe_name(result.id)}.png"
        try:
            ensure_dir(self.dir / EXAMPLES_DIR)  # a real folder, not a link out of the run directory
            with atomic_writer(self.dir / rel) as f:
                evidence[1].save(f, format="PNG")
        except Exception as exc:  # noqa: BLE001 - a picture is never worth a failed latent
            warnings.warn(f"no examples image for {result.id}: {type(exc).__name__}: {exc}", stacklevel=2)
            return {"examples": record | {"image": None}}
        return {"examples": record | {"image": rel}}


__all__ = ["EXAMPLES_DIR", "ExamplesWriter"]
