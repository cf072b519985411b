"""Result objects returned by ``LatentExplainer.attribute`` and their results.json form."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

from .types import Response, Traversal, usage_of  # noqa: F401 (usage_of re-exported)

SCHEMA_VERSION = 1
Status = Literal["ok", "failed", "skipped"]


def total_usage(entries: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The sum of the ``usage`` of results.json latent entries (the run header's ``usage``)."""
    total = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
    for entry in entries:
        usage = entry.get("usage") if isinstance(entry, dict) else None
        if isinstance(usage, dict):
            for key in total:
                value = usage.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    total[key] += value
    return total


def responses_json(responses: Iterable[Response]) -> list[dict[str, Any]]:
    """The results.json form of answers: text, abstained, error, finish_reason, and their claims."""
    return [
        {"text": r.text, "abstained": r.abstained, "error": r.error, "finish_reason": (r.meta or {}).get("finish_reason")}
        | ({"attribute": str(r.meta["attribute"])} if (r.meta or {}).get("attribute") else {})
        | ({"claims": list(r.meta["claims"])} if isinstance((r.meta or {}).get("claims"), list) else {})
        for r in responses
    ]


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
    evidence: Any = None  # evidence.Evidence: what the images show (None when not measured)
    # SAE features with example evidence: (ExampleSet, prompt image); its record is extras["examples"]
    example_evidence: Any = None

    def to_json(self, strip: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "status": self.status,
            "explanation": self.explanation if self.clear else None,
            "certainty": self.certainty,
            "clear": bool(self.clear),
            "responses": responses_json(self.responses),
            "usage": usage_of(self.responses),
            "strip": strip,
            "error": self.error,
            "timing": {k: round(v, 4) for k, v in self.timing.items()},
            "evidence": self.evidence.to_json() if self.evidence is not None else None,
        } | self.extras

    # what a ranking (``RankThenExplain``, ``rank_latents``) recorded for this latent, else None
    @property
    def attribution(self) -> float | None:
        """Mean |attribution| of the ranking score to this latent."""
        return self.extras.get("attribution")

    @property
    def rank(self) -> int | None:
        """1 for the latent the score depends on most."""
        return self.extras.get("rank")

    @property
    def delta(self) -> float | None:
        """Mean |convergence delta| of the attribution method (None when it has none)."""
        return self.extras.get("delta")


@dataclass
class ExplanationResults:
    """All latents of one ``attribute`` call, in target order; iterable and indexable like a list."""

    results: list[LatentResult]
    info: dict[str, Any] = field(default_factory=dict)
    ranking: Any = None  # RankedLatents of every latent when the results come from RankThenExplain

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
        """A compact table for notebooks; every model- or backend-provided text is escaped."""
        ranked = any(r.rank is not None for r in self.results)
        head = "<th>rank</th><th>latent</th><th>attribution</th>" if ranked else "<th>latent</th>"
        rows = []
        for r in self.results:
            if r.status == "failed":
                text, style = f"failed: {html.escape(str(r.error))}", "color:#b33"
            elif r.clear and r.explanation:
                text, style = html.escape(r.explanation), ""
            else:
                text, style = "no clear explanation", "color:#8a5a00;font-style:italic"
            cert = "" if r.certainty is None else (
                f"<span style='display:inline-block;width:60px;height:8px;background:#eee;vertical-align:middle'>"
                f"<span style='display:block;height:8px;width:{60 * max(0.0, min(1.0, r.certainty)):.0f}px;"
                f"background:{'#2a7' if r.clear else '#d90'}'></span></span> {r.certainty:.2f}")
            lead = (f"<td>{'' if r.rank is None else int(r.rank)}</td><td>{html.escape(r.id)}</td>"
                    f"<td>{'' if not isinstance(r.attribution, (int, float)) else f'{r.attribution:.3g}'}</td>") if ranked else (
                f"<td>{html.escape(r.id)}</td>")
            rows.append(f"<tr>{lead}<td>{cert}</td><td style='text-align:left;{style}'>{text}</td></tr>")
        return (f"<table><thead><tr>{head}<th>certainty</th><th>explanation</th></tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")

    def plot(self, ax: Any = None) -> Any:
        """Certainty per latent (and attribution when ranked) as a matplotlib Figure (no pyplot)."""
        from .plots import results_figure

        return results_figure(self, ax=ax)

    def __repr__(self) -> str:
        lines = [f"ExplanationResults({len(self.results)} latents)"]
        for r in self.results:
            text = r.explanation if r.clear else ("no clear explanation" if r.status == "ok" else f"{r.status}: {r.error}")
            cert = "" if r.certainty is None else f" [{r.certainty:.2f}]"
            rank = "" if r.rank is None else f"#{r.rank} "
            attr = f" (attribution {r.attribution:.3g})" if isinstance(r.attribution, (int, float)) else ""
            lines.append(f"  {rank}{r.id}{cert}: {text}{attr}")
        return "\n".join(lines)
