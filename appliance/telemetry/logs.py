"""Structured logs: one JSON object per line, with no keys, image bytes or raw query strings (RELIABILITY 15)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

# Keys are secrets (PEKAT's api_key and stop key, imagerecognize's and RAYPACK's apikey), and `data` may carry a
# customer's serial numbers: none of them is logged (RELIABILITY 15).
_SECRET_PARAMS = re.compile(r"(?i)((?:^|[?&])(?:api_key|apikey|key|data)=)[^&#\s]*")
_EXTRA_FIELDS = ("project", "request_id", "endpoint", "api", "status", "duration_ms", "peer", "query", "method",
                 "path")


def redact_query(query: str) -> str:
    """`a=1&api_key=secret` -> `a=1&api_key=***` (and `apikey=`, the stop key's `key=`, and `data=`)."""
    return _SECRET_PARAMS.sub(r"\1***", query)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ParserErrorFilter(logging.Filter):
    """aiohttp logs a bad request line with a traceback that quotes the line, api_key included (RELIABILITY 1.9).

    This turns such records into one WARNING line without the request text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        name = type(exc).__name__ if exc is not None else ""
        if exc is not None and ("HttpProcessingError" in [c.__name__ for c in type(exc).__mro__]
                                or name in ("BadHttpMessage", "LineTooLong", "BadStatusLine", "InvalidHeader")):
            record.msg = "rejected a malformed HTTP request: %s"
            record.args = (name,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Logs go to stderr (journald) or a file; stdout stays free for the PEKAT launch markers (PROTOCOL.md 6)."""
    handler: logging.Handler
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ParserErrorFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
