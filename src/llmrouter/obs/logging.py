"""Structured logs: one JSON object a line on stderr, with secrets masked.

Keys are never logged; as a second line of defence, anything shaped like an llmrouter key or a
bearer token is masked in every message before it is written.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

import msgspec

__all__ = ["access_log", "configure_logging", "redact"]

_SECRET = re.compile(r"lr-[0-9A-Za-z]{12}_[0-9A-Za-z]+|(?i:bearer)\s+\S+")
_encoder = msgspec.json.Encoder()
_access = logging.getLogger("llmrouter.access")


def redact(text: str) -> str:
    return _SECRET.sub("[REDACTED]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return _encoder.encode(line).decode()


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def access_log(fields: dict[str, Any]) -> None:
    """One line a request, written straight to stderr: the same shape as the other log lines,
    without the logging module's per-record machinery on the hot path. The fields come from our
    own code and carry no secrets (keys are logged by id only)."""
    if _access.isEnabledFor(logging.INFO):
        line = {"ts": round(time.time(), 3), "level": "info", "logger": _access.name}
        line["pid"] = os.getpid()
        line["msg"] = "request"
        line.update(fields)
        sys.stderr.write(_encoder.encode(line).decode() + "\n")
        sys.stderr.flush()
