"""Structured logging for the router: JSON lines for machines, a short format for people, no secrets.

Every handler gets a redaction filter, so no record is written with a secret in it: the secrets the
configuration declared (:mod:`ops.secrets`), URL passwords and query values, ``Authorization``
values, bearer tokens, webhook secrets (``whsec_...``) and the values of fields named like
password/secret/token/authorization are masked, in the message, in ``extra=`` fields and in
tracebacks. A line logged within a span carries its ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from json import dumps
from typing import Any, TextIO

from ops.secrets import redact, redact_field
from ops.tracing import current_ids

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_CORE_FIELDS = ("ts", "level", "logger", "msg")
_TRACEBACK_FORMATTER = logging.Formatter()
# These libraries log a line per HTTP request at INFO; at thousands of deliveries a second that
# would bury everything else.
_CHATTY_LOGGERS = ("httpx", "httpcore")


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in record.__dict__.items() if key not in _RECORD_ATTRIBUTES}


def _trace_fields() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the span the record was logged in, if any (see ops.tracing)."""
    ids = current_ids()
    return {} if ids is None else {"trace_id": ids[0], "span_id": ids[1]}


class RedactingFilter(logging.Filter):
    """Rewrites each record in place so no handler after it can write a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact message, extra fields and traceback; never drops a record."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A format string that does not fit its arguments must still be logged, not raise at
            # the caller; keep both parts so the mistake is visible.
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        for key, value in _extra_fields(record).items():
            setattr(record, key, redact_field(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACK_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the ``extra=`` fields, and exc when failing."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as a single JSON line."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in _extra_fields(record).items() if k not in _CORE_FIELDS})
        entry.update(_trace_fields())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return dumps(entry, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """``12:04:05 WARNING router.delivery_worker: message key=value`` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record as one short line, then its traceback if any."""
        clock = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extra = {**_extra_fields(record), **_trace_fields()}
        fields = " ".join(f"{key}={value}" for key, value in extra.items())
        line = f"{clock} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line = f"{line}  {fields}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{record.stack_info}"
        return line


class RouterLogHandler(logging.StreamHandler[TextIO]):
    """The handler ``configure_logging`` installs; its own class so reconfiguring replaces only it."""


def configure_logging(level: str = "INFO", json: bool | None = None, stream: TextIO | None = None) -> None:
    """Send all logs to stderr (or ``stream``), redacted: JSON lines unless writing to a terminal.

    ``json`` forces the format either way; ``level`` is DEBUG, INFO, WARNING, ERROR or CRITICAL.
    """
    threshold = logging.getLevelNamesMapping().get(level.upper())
    if threshold is None:
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    output = stream if stream is not None else sys.stderr
    as_json = json if json is not None else not output.isatty()
    handler = RouterLogHandler(output)
    handler.setFormatter(JsonLineFormatter() if as_json else ConsoleFormatter())
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, RouterLogHandler)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(threshold)
    redact_every_handler()
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(threshold if threshold <= logging.DEBUG else logging.WARNING)


def redact_every_handler() -> None:
    """Put the redaction filter on every handler of every logger, ours and those libraries set up."""
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
                handler.addFilter(RedactingFilter())
