"""Structured logs without keys, image bytes or raw query strings (RELIABILITY 15), in the form the reader needs.

- Under systemd (stderr is the journal stream that `JOURNAL_STREAM` names): each JSON line carries its syslog
  level as an sd-daemon prefix (`<3>{...}`), so that `journalctl -p warning` filters by level.
- On a terminal: one human-readable line (local time, level, logger, message, the request's fields).
- Anywhere else (a pipe, `--log-file`): one JSON object per line. `--log-file` rotates by size and count.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

# Keys are secrets (PEKAT's api_key and stop key, imagerecognize's and RAYPACK's apikey), and `data` may carry a
# customer's serial numbers: none of them is logged (RELIABILITY 15).
_SECRET_PARAMS = re.compile(r"(?i)((?:^|[?&])(?:api_key|apikey|key|data)=)[^&#\s]*")
_EXTRA_FIELDS = ("project", "request_id", "endpoint", "api", "status", "duration_ms", "peer", "query", "method",
                 "path")
# What a person at a terminal needs of a request line; method, path and status are already in its message.
_HUMAN_FIELDS = ("project", "request_id", "api", "duration_ms", "peer", "query")

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
_SIZE = re.compile(r"(?i)^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$")


def redact_query(query: str) -> str:
    """`a=1&api_key=secret` -> `a=1&api_key=***` (and `apikey=`, the stop key's `key=`, and `data=`)."""
    return _SECRET_PARAMS.sub(r"\1***", query)


def syslog_priority(levelno: int) -> int:
    """Python's level -> syslog's (sd-daemon(3)): CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


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


class JournalFormatter(JsonFormatter):
    """`<4>{"ts": ...}`: journald strips the prefix and stores the line at that priority (SyslogLevelPrefix=).

    The JSON keeps a traceback inside the one line, so it stays one journal entry at its own priority.
    """

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>" + super().format(record)


class HumanFormatter(logging.Formatter):
    """`2024-05-02 14:03:07.412 WARNING appliance.server: POST /analyze_image 401  project=demo request_id=... `"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = []
        for name in _HUMAN_FIELDS:
            value = getattr(record, name, None)
            if value is None or value == "":
                continue
            fields.append(f"{value} ms" if name == "duration_ms" else f"{name}={value}")
        if fields:
            line += "  " + " ".join(fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


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


def is_journal_stream(stream: TextIO | None, environ: dict[str, str] | None = None) -> bool:
    """True when `stream` is the journal connection systemd set up: JOURNAL_STREAM is its `st_dev:st_ino`.

    systemd exports JOURNAL_STREAM whenever stdout or stderr goes to the journal; the variable is inherited by
    children whose stderr may be a file or pipe, so the stream itself is compared (systemd.exec(5)).
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if stream is None or not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # no descriptor (a StringIO, a closed or detached stream)
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stream_formatter(stream: TextIO) -> logging.Formatter:
    """The journal gets prefixed JSON, a terminal the human format, a pipe or file plain JSON lines."""
    if is_journal_stream(stream):
        return JournalFormatter()
    if _is_terminal(stream):
        return HumanFormatter()
    return JsonFormatter()


def log_size(text: str) -> int:
    """argparse type for --log-max-bytes: `10485760`, `512K`, `10M`, `1G` (binary units), `0` (no rotation)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 10M, 512K, 1048576, or 0)")
    return int(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " ")


def log_backups(text: str) -> int:
    """argparse type for --log-backups: how many rotated files to keep, at least 1."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: keep at least 1 rotated file")
    return count


class _RotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Formats each record once: the stock handler formats it to measure it, then again to write it."""

    _formatted: tuple[logging.LogRecord, str] | None = None

    def format(self, record: logging.LogRecord) -> str:
        if self._formatted is None or self._formatted[0] is not record:
            self._formatted = (record, super().format(record))
        return self._formatted[1]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        finally:
            self._formatted = None


def file_handler(log_file: Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 backups: int = DEFAULT_BACKUPS) -> logging.FileHandler:
    """`log_file` rotated at `max_bytes` into `.1` ... `.<backups>`; with max_bytes 0 it is never rotated here,
    but reopened when an external logrotate moves it away."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if max_bytes <= 0:
        return logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
    if backups < 1:
        raise ValueError("rotating a log file needs at least 1 backup")
    return _RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")


def configure_logging(level: str = "INFO", log_file: Path | None = None, max_bytes: int | None = None,
                      backups: int | None = None) -> None:
    """Logs go to stderr (journald, a terminal) or a file; stdout stays free for the PEKAT launch markers
    (`__SERVER_RUNNING__`, `STOP_INIT_MODEL`), which are never prefixed or reformatted."""
    handler: logging.Handler
    if log_file is not None:
        handler = file_handler(log_file, DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
                               DEFAULT_BACKUPS if backups is None else backups)
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(stream_formatter(sys.stderr))
    handler.addFilter(ParserErrorFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
        existing.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").disabled = True
