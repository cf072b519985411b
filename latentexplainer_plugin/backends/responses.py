"""Turning a raw model answer into a :class:`Response`: strip chat boilerplate, spot abstentions.

Chat models wrap a one-line explanation in politeness and markdown ("Sure! Here is the
explanation: **The object rotates.** Let me know if ..."). Agreement between samples is measured
on the remaining text, so :func:`clean_response` removes

* leading filler: ``Sure``, ``Certainly``, ``Of course``, ``Okay``, ``Absolutely`` (with ``!``, ``.``
  or ``,``) and lead-ins such as ``Here is the explanation:``, ``Here's my answer:``,
  ``Explanation:``, ``Answer:``, ``Description:``;
* markdown: ``#`` headers, ``**bold**`` / ``__bold__`` / ``*italic*``, inline back-ticks, bullets
  (``-``, ``*``, ``+``, ``•``, ``1.``, ``1)``) and block quotes (``>``); lines are joined with spaces;
* quotes around the whole answer (``"..."``, ``'...'``, ``“...”``, ``‘...’``, back-ticks);
* trailing filler: sentences starting ``Let me know if``, ``I hope this helps``, ``Feel free to``,
  ``Hope this helps``, ``If you have any``, ``If you need``.

An answer that says nothing visible changes or that the model cannot tell is a valid sample but
never a clear explanation: it is kept (``text`` set) and marked ``abstained=True``. The phrases
(:data:`ABSTENTION_PATTERNS`, matched case-insensitively on the cleaned text) are deliberately
few and specific:

* "no visible / noticeable / discernible / apparent / obvious / clear / significant change(s)";
  a bare "no change(s)" only as "There is / There are / I see no change" or at the very start
  ("the shape makes no change in colour while it grows" is an explanation);
  "no (visible / noticeable) difference(s)";
* "nothing changes", "nothing (visibly / noticeably / really) changes", "nothing seems to change";
* "cannot tell", "can't tell", "unable to tell / determine / identify / see / discern",
  "I cannot / can't determine / identify / see / discern";
* "the images are / look / appear identical / the same" and "all images are identical".

A phrase followed in the same sentence by a contrast ("except", "but", "other than", "apart from",
"aside from", "besides", "save for", "only", "whereas", "however") is *not* an abstention: "Nothing changes except the
colour turns red" explains a latent.

An empty answer, or one that is only boilerplate, becomes ``Response(text=None, error="empty
response")``.
"""

from __future__ import annotations

import re

from ..types import Response

__all__ = ["clean_response", "is_abstention", "ABSTENTION_PATTERNS", "EMPTY_ERROR"]

EMPTY_ERROR = "empty response"

_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}

# Leading filler, applied repeatedly at the very start of the (joined) text.
_LEADING = [
    re.compile(r"^(sure|certainly|of course|okay|ok|absolutely|alright|great)\s*[!.,:]+\s*", re.I),
    re.compile(
        r"^(here(\s+is|\s+are|'s|’s)\s+(the|my|an?|your)?\s*"
        r"(short\s+|brief\s+|concise\s+|one-sentence\s+)?"
        r"(explanation|answer|description|summary|response)s?"
        r"(\s+(of|for)\s+[^:]{0,60})?\s*[:.\-–—]\s*)",
        re.I,
    ),
    re.compile(r"^(the\s+)?(explanation|answer|description|summary|response|final answer)\s*[:\-–—]\s*", re.I),
]

# Trailing filler: a sentence starting with one of these, to the end of the text.
_TRAILING = re.compile(
    r"(^|(?<=[.!?])\s+)(let me know if|i hope this helps|hope this helps|feel free to|"
    r"if you have any|if you need)\b.*$",
    re.I | re.S,
)

_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,2}[.)])\s+")
_HEADER = re.compile(r"^\s*#{1,6}\s*")
_QUOTE_LINE = re.compile(r"^\s*>\s?")
_BOLD = re.compile(r"(\*\*|__)(.+?)\1", re.S)
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", re.S)
_CODE = re.compile(r"`([^`]*)`")
# A line that is only a label ("## Explanation", "Answer:").
_LABEL_LINE = re.compile(r"^(the\s+)?(explanation|answer|description|summary|response|final answer)\s*:?$", re.I)

#: Regular expressions (case-insensitive, on cleaned text) that mark an abstention.
ABSTENTION_PATTERNS: list[str] = [
    r"\bno\s+(?:visible|noticeable|discernible|apparent|obvious|clear|significant|meaningful|perceptible)\s+changes?\b",
    r"(?:^|\bthere\s+(?:is|are|appears\s+to\s+be|seems\s+to\s+be)\s+|\bi\s+(?:see|observe|notice)\s+)no\s+changes?\b",
    r"\bno\s+(?:(?:visible|noticeable|discernible|apparent|obvious|clear)\s+)?differences?\b",
    r"\bnothing\s+(?:(?:visibly|noticeably|really|actually|much)\s+)?changes\b",
    r"\bnothing\s+(?:seems|appears)\s+to\s+change\b",
    r"\b(?:cannot|can't|can\s+not|could\s+not|couldn't)\s+(?:really\s+)?(?:tell|determine|identify|see|discern)\b",
    r"\bunable\s+to\s+(?:tell|determine|identify|see|discern)\b",
    r"\b(?:the|all|these)\s+(?:\w+\s+)?images\s+(?:are|look|appear|seem)\s+(?:to\s+be\s+)?(?:all\s+)?(?:identical|the\s+same)\b",
]
_ABSTAIN = [re.compile(p, re.I) for p in ABSTENTION_PATTERNS]
_CONTRAST = re.compile(
    r"\b(except|but|other\s+than|apart\s+from|aside\s+from|besides|save\s+for|only|whereas|however)\b", re.I
)


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and text[0] in _QUOTE_PAIRS and text[-1] == _QUOTE_PAIRS[text[0]]:
        inner = text[1:-1].strip()
        # Do not strip when the quotes are two separate quoted parts ("a" and "b").
        if text[0] in inner and text[0] not in ("'",):
            break
        text = inner
    return text


def _clean_line(line: str) -> str:
    line = _QUOTE_LINE.sub("", line)
    line = _HEADER.sub("", line)
    bullet = bool(_BULLET.match(line))
    line = _BULLET.sub("", line).strip()
    if _LABEL_LINE.match(line):
        return ""
    if bullet and line and line[-1] not in ".!?;:,":
        line += "."  # list items become sentences when joined
    return line


def is_abstention(text: str) -> bool:
    """True when ``text`` says that nothing visible changes or that the model cannot tell."""
    norm = text.replace("’", "'").replace("‘", "'")
    for pattern in _ABSTAIN:
        for match in pattern.finditer(norm):
            rest = re.split(r"[.!?;\n]", norm[match.end():], maxsplit=1)[0]
            if not _CONTRAST.search(rest):
                return True
    return False


def clean_response(text: str | None) -> Response:
    """Strip boilerplate from a raw answer; mark abstentions; empty answers become failed samples."""
    if text is None or not text.strip():
        return Response(text=None, error=EMPTY_ERROR)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _BOLD.sub(r"\2", text)
    text = _ITALIC.sub(r"\1", text)
    text = _CODE.sub(r"\1", text)
    lines = [_clean_line(line) for line in text.split("\n")]
    text = " ".join(line for line in lines if line)
    text = re.sub(r"\s+", " ", text).strip()

    changed = True
    while changed and text:
        before = text
        text = _strip_quotes(text)
        for pattern in _LEADING:
            text = pattern.sub("", text, count=1).strip()
        text = _TRAILING.sub("", text).strip()
        text = text.strip("*_#>- \t").strip()
        changed = text != before

    if not text or not re.search(r"\w", text):
        return Response(text=None, error=EMPTY_ERROR)
    return Response(text=text, abstained=is_abstention(text))
