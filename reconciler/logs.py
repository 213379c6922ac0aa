"""Log output: human-readable lines by default, JSON lines with `--log-format json`.

Every module logs through the standard library (`logging.getLogger(__name__)`) and each event is
a constant message plus fields, so that logs can be searched and counted by message::

    log.info("pass finished", extra=fields(outcome="applied", revision=sha, seconds=1.2))

The CLI calls `configure_logging(fmt)` once at start-up. Both formats render the same event:

    human:  2026-12-05T07:14:33Z INFO  reconciler.loop: pass finished outcome=applied revision=3f2a...
    json:   {"time": "2026-12-05T07:14:33.120Z", "level": "info", "logger": "reconciler.loop",
             "message": "pass finished", "outcome": "applied", "revision": "3f2a..."}

Every string that leaves here (message, field values, exception text) goes through `_scrub`, the
one place where secret redaction is applied.
"""

from __future__ import annotations

import enum
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from reconciler import redact

__all__ = ["FIELDS_KEY", "LogFormat", "configure_logging", "fields"]

FIELDS_KEY = "fields"  # the `extra` key that carries an event's fields
_RESERVED = frozenset({"time", "level", "logger", "message", "error"})
_HANDLER_NAME = "reconciler-logs"


class LogFormat(enum.StrEnum):
    HUMAN = "human"
    JSON = "json"


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: `log.info("pass finished", extra=fields(outcome=...))`."""
    return {FIELDS_KEY: values}


def _scrub(text: str) -> str:
    """Remove every secret the process holds from text about to be logged: the one place each log string passes."""
    return redact.scrub(text)


def _event_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    value = getattr(record, FIELDS_KEY, None)
    return value if isinstance(value, Mapping) else {}


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a field value with every string scrubbed."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {_scrub(str(key)): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    return _scrub(str(value))


def _timestamp(created: float, *, millis: bool) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{int(created % 1 * 1000):03d}Z" if millis else f"{stamp}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields sit beside the fixed keys (a clashing field gets `field_`)."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": _timestamp(record.created, millis=True),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _scrub(record.getMessage()),
        }
        for key, value in _event_fields(record).items():
            name = f"field_{key}" if key in _RESERVED else _scrub(str(key))
            event[name] = _plain(value)
        if record.exc_info:
            event["error"] = _scrub(self.formatException(record.exc_info))
        return json.dumps(event, ensure_ascii=False, default=str)


def _logfmt_value(value: Any) -> str:
    plain = _plain(value)
    if not isinstance(plain, str):  # numbers, lists, mappings: compact JSON
        return json.dumps(plain, ensure_ascii=False, separators=(",", ":"))
    if plain == "" or any(char in plain for char in ' "=\\') or not plain.isprintable():
        return json.dumps(plain)  # escaped: no control or line-separator character reaches the terminal
    return plain


class HumanFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`; values with spaces or quotes are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        message = _scrub(record.getMessage())
        parts = [
            _timestamp(record.created, millis=False),
            f"{record.levelname:<5}",
            f"{record.name}:",
            message if message.isprintable() else json.dumps(message),
        ]
        parts.extend(f"{_scrub(str(key))}={_logfmt_value(value)}" for key, value in _event_fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + _scrub(self.formatException(record.exc_info))
        return line


def configure_logging(
    fmt: LogFormat | str = LogFormat.HUMAN, *, level: int = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send the `reconciler` loggers to `stream` (stderr) in `fmt`; calling it again replaces the handler.

    An unknown format raises ValueError (the CLI offers the choices, so this is a programming error).
    """
    chosen = LogFormat(fmt)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if chosen is LogFormat.JSON else HumanFormatter())
    root = logging.getLogger("reconciler")
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return handler
