r"""Secrets out of text that came from elsewhere.

An upstream's error message is relayed to the client, and a proxy between llmrouter and the
upstream may quote the request it received, `Authorization` included. Each adapter passes what an
upstream says through its `Redactor` before the text goes anywhere (an error's message, which is
relayed, logged or stored), so the secrets it sends (its key, its configured header values) never
come back out.

What counts as a secret's appearance: the value itself in any letter case; the credential of a
value written `Scheme credential` (`Bearer sk-...`, `Basic dXNl...`) on its own; either as a JSON
string writes it (`\/` for `/`) or a URL quotes it (`%2F`); and any word that begins with the first
12 characters of one of those, since a quote may be cut short.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import quote

__all__ = ["REDACTED", "Redactor"]

REDACTED = "[redacted]"
# A configured value shorter than this is not treated as a secret: redacting "1" or "json" would
# garble every message, and nothing that short is a credential.
SHORTEST_SECRET = 8
# A word that begins with this much of a secret is taken for a quote of it cut short.
PREFIX = 12


class Redactor:
    """Replaces every appearance of each secret with `[redacted]`."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str | None]) -> None:
        values: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            values.add(secret)
            scheme, _, credential = secret.strip().partition(" ")
            if credential and scheme.isalpha():
                values.add(credential.strip())
        alternatives: set[str] = set()
        for value in (v for v in values if len(v) >= SHORTEST_SECRET):
            # the value, or a word beginning with its first characters; each as written, as a
            # JSON string writes it and as a URL quotes it
            cut = len(value) > PREFIX
            for form in (_as_written, _as_json, _as_url):
                written = form(value[:PREFIX] if cut else value)
                alternatives.add(re.escape(written) + (r"\S*" if cut else ""))
        ordered = sorted(alternatives, key=len, reverse=True)
        self._pattern = re.compile("|".join(ordered), re.IGNORECASE) if ordered else None

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)


def _as_written(value: str) -> str:
    return value


def _as_json(value: str) -> str:
    return json.dumps(value)[1:-1].replace("/", "\\/")


def _as_url(value: str) -> str:
    return quote(value, safe="")
