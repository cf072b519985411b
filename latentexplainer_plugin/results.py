"""Result objects returned by ``LatentExplainer.attribute`` and their results.json form."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from .types import Response, Traversal

SCHEMA_VERSION = 1
Status = Literal["ok", "failed", "skipped"]


@dataclass
class LatentResult:
    """The outcome for one latent (or direction)."""

    id: str
    index: int
    status: Status
    explanation: str | None = None
    certainty: float | None = None
    clear: bool = False
    responses: list[Response] = field(default_factory=list)
    traversal: Traversal | None = None
    error: str | None = None
    timing: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # kl, factor, attribution, ...

    def to_json(self, strip: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "status": self.status,
            "explanation": self.explanation if self.clear else None,
            "certainty": self.certainty,
            "clear": bool(self.clear),
            "responses": [
                {"text": r.text, "abstained": r.abstained, "error": r.error} for r in self.responses
            ],
            "strip": strip,
            "error": self.error,
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
        } | self.extras


@dataclass
class ExplanationResults:
    """All latents of one ``attribute`` call, in target order; iterable and indexable like a list."""

    results: list[LatentResult]
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[LatentResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> LatentResult:
        return self.results[i]

    @property
    def failed(self) -> list[LatentResult]:
        return [r for r in self.results if r.status == "failed"]

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(r.id)}</td><td>{html.escape(r.status)}</td>"
            f"<td>{'' if r.certainty is None else f'{r.certainty:.2f}'}</td>"
            f"<td>{html.escape(r.explanation) if r.clear and r.explanation else '<i>no clear explanation</i>'}</td></tr>"
            for r in self.results
        )
        return ("<table><thead><tr><th>latent</th><th>status</th><th>certainty</th><th>explanation</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>")

    def __repr__(self) -> str:
        lines = [f"ExplanationResults({len(self.results)} latents)"]
        for r in self.results:
            text = r.explanation if r.clear else ("no clear explanation" if r.status == "ok" else f"{r.status}: {r.error}")
            cert = "" if r.certainty is None else f" [{r.certainty:.2f}]"
            lines.append(f"  {r.id}{cert}: {text}")
        return "\n".join(lines)
