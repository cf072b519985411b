"""Keeping credentials out of messages, logs and files: URLs with user:password or secret query values."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

_SECRET_QUERY = re.compile(r"key|token|secret|password|passwd|auth|sig", re.I)


def redact_url(url: str) -> str:
    """``url`` with its user:password (and secret-looking query values) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = "&".join(f"{k}=***" if _SECRET_QUERY.search(k) else f"{k}={v}" for k, v in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> set[str]:
    """The secret parts of ``url`` as they may appear in text: user info (raw and decoded), secret query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return set()
    found: set[str] = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found |= {userinfo, unquote(userinfo)}
        user, _, password = userinfo.partition(":")
        found |= {user, unquote(user), password, unquote(password)}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY.search(k) and v:
            found |= {v}
    return {s for s in found if s}
