"""Structured logs: one JSON object per line, one line per event.

    log = get_logger(__name__)
    log.info("upsert.batch", items=32, seconds=0.41)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class EventLogger(logging.LoggerAdapter):
    """`log.info("event.name", key=value, ...)`: keyword arguments become JSON fields."""

    def _log_event(self, level: int, event: str, exc_info: bool = False, **fields: Any) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, event, extra={"fields": fields}, exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:  # type: ignore[override]
        self._log_event(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:  # type: ignore[override]
        self._log_event(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:  # type: ignore[override]
        self._log_event(logging.WARNING, event, **fields)

    def error(self, event: str, **fields: Any) -> None:  # type: ignore[override]
        self._log_event(logging.ERROR, event, **fields)

    def exception(self, event: str, **fields: Any) -> None:  # type: ignore[override]
        self._log_event(logging.ERROR, event, exc_info=True, **fields)


_configured = False


def configure(level: int = logging.INFO) -> None:
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("es_ray")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    _configured = True


def get_logger(name: str) -> EventLogger:
    configure()
    return EventLogger(logging.getLogger(name), {})
