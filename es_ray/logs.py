"""Structured logs: one JSON object per line, one line per event.

    log = get_logger(__name__)
    log.info("upsert.batch", items=32, seconds=0.41)

A command a person runs sends them, with everything else its process writes, to a file (`to_file`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, TextIO


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


_handler: logging.StreamHandler | None = None


def configure(level: int = logging.INFO) -> None:
    global _handler
    if _handler is not None:
        return
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(JsonFormatter())
    root = logging.getLogger("es_ray")
    root.addHandler(_handler)
    root.setLevel(level)
    root.propagate = False


@contextlib.contextmanager
def to_file(path: Path, verbose: bool = False) -> Iterator[TextIO]:
    """Everything this process writes goes to `path` (appended) while inside: our JSON logs, Ray's and
    Ray Data's, warnings, tqdm, and what C++ libraries print (Ray's core worker), which is why the file
    descriptors 1 and 2 are redirected and not only Python's streams. Yields the terminal as it was
    (a copy of stdout) for the display. `verbose`: the file is also shown on the terminal's stderr."""
    configure()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    log_file = open(path, "a", buffering=1)  # noqa: SIM115 - closed below, after the fds are restored
    shown = _Follow(path, os.dup(2)) if verbose else None
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    sys.stdout = sys.stderr = log_file  # also where Python's streams are not fds 1 and 2 (pytest)
    previous = _handler.setStream(log_file)
    # Other libraries' loggers that reach the root logger, and warnings (platformdirs' RuntimeDirWarning)
    # as log lines with a time, also where something (pytest) holds on to the original streams.
    others = logging.StreamHandler(log_file)
    others.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(others)
    logging.captureWarnings(True)
    try:
        yield terminal
    finally:
        logging.captureWarnings(False)
        logging.getLogger().removeHandler(others)
        _handler.setStream(previous)
        sys.stdout, sys.stderr = saved_streams
        log_file.flush()
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        log_file.close()
        if shown is not None:
            shown.stop()
        terminal.close()


class _Follow:
    """`tail -f` of the log file onto the terminal (--verbose): a thread, so that writes of C++ code
    reach the terminal too, and a file, so that nothing keeps a pipe open after the command ends."""

    def __init__(self, path: Path, fd: int):
        self.source, self.target = open(path, "rb"), fd  # noqa: SIM115 - closed in stop()
        self.source.seek(0, os.SEEK_END)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-follow", daemon=True)
        self._thread.start()

    def _copy(self) -> bool:
        chunk = self.source.read()
        if chunk:
            os.write(self.target, chunk)
        return bool(chunk)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._copy():
                self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._copy()
        self.source.close()
        os.close(self.target)


def get_logger(name: str) -> EventLogger:
    configure()
    return EventLogger(logging.getLogger(name), {})
