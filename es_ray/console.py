"""What a person sees in the terminal: the current step, a progress bar per long step, a table that grows.

    with Display(terminal) as display:
        display.step("Loading 1000 documents")
        with display.bar("upsert", total=1000, unit="items") as bar:
            bar.update(200)
        display.table("quality by round", ["round", "nDCG@10"])
        display.add_row(["0", "0.81"])

On a terminal this is one rich live display. Anywhere else (CI, a pipe, `make demo > file`, a Ray job's
log) it prints plain lines, one per step, result or table row, and a progress line at most every
`every_s` seconds: a live display written to a file is a screenful of redraws. The progress lines have a
fixed form that `parse_progress` reads back, so the follower of a Ray job can show the job's own
progress as a bar. Log lines never come here: they go to a file (logs.to_file).
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from es_ray.logs import get_logger

log = get_logger(__name__)
QUIET_S = 60.0  # plain mode: a progress line that did not move is printed again only this often

# "upsert: 200/1000 items (20%, 12 s, ETA 48 s)"; the total is "?" while unknown.
PROGRESS_LINE = re.compile(r"^(?P<description>[^:\n]+): (?P<completed>\d+)/(?P<total>\d+|\?) (?P<unit>\S+)")


def parse_progress(line: str) -> tuple[str, int, int | None] | None:
    """(description, completed, total) of a plain progress line, else None."""
    match = PROGRESS_LINE.match(line.strip())
    if match is None:
        return None
    total = match["total"]
    return match["description"], int(match["completed"]), None if total == "?" else int(total)


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


class Bar:
    """One long step's progress: counts, elapsed time and ETA. `done()` (or leaving the `with`) ends it
    with a result line."""

    def __init__(self, display: "Display", description: str, total: int | None, unit: str):
        self.display, self.description, self.total, self.unit = display, description, total, unit
        self.completed, self.started = 0, time.monotonic()
        self._printed_at, self._printed_count = 0.0, -1  # plain mode: when and at which count it last printed
        self._task: TaskID | None = None
        if display.live:
            self._task = display._progress.add_task(description, total=total, unit=unit)
        else:
            self._print()

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        total = "?" if self.total is None else str(self.total)
        text = f"{self.description}: {self.completed}/{total} {self.unit}"
        if self.total and 0 < self.completed < self.total:
            eta = elapsed / self.completed * (self.total - self.completed)
            return text + f" ({100 * self.completed // self.total}%, {_seconds(elapsed)}, ETA {_seconds(eta)})"
        return text + f" ({_seconds(elapsed)})"

    def _print(self) -> None:
        self._printed_at, self._printed_count = time.monotonic(), self.completed
        self.display._write(self.line())

    def update(self, completed: int, total: int | None = None, description: str | None = None) -> None:
        self.completed = completed
        self.total = total if total is not None else self.total
        self.description = description or self.description
        if self._task is not None:
            self.display._progress.update(self._task, completed=completed, total=self.total,
                                          description=self.description)
        elif self._printed_at >= 0:  # not done yet
            since = time.monotonic() - self._printed_at
            if since >= self.display.every_s and (self.completed != self._printed_count or since >= QUIET_S):
                self._print()

    def advance(self, amount: int = 1) -> None:
        self.update(self.completed + amount)

    def done(self) -> None:
        if self._task is not None:
            self.display._progress.remove_task(self._task)
            self._task = None
            self.display.note(self.line())
        elif self._printed_at >= 0 and self.completed != self._printed_count:
            self._print()
        self._printed_at = -1.0  # done once

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.done()


class Display:
    """The terminal of one command. `live=None`: a live display if `file` is a terminal, else plain lines;
    True or False decides (True draws as on a terminal wherever `file` goes)."""

    def __init__(self, file: TextIO | None = None, live: bool | None = None, every_s: float = 10.0):
        self.console = Console(file=file or sys.stdout, force_terminal=live)
        self.live = self.console.is_terminal
        self.every_s = every_s
        self._step = ""
        self._table: Table | None = None
        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), console=self.console)
        self._live: Live | None = None

    def __enter__(self) -> "Display":
        if self.live:
            # Python's stdout and stderr stay where they are (the log file, logs.to_file): rich would
            # otherwise print whatever reaches them above the live display.
            self._live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._live is not None:
            if exc_type is None:
                self._step = ""  # the last state stays on screen, without a finished step; after an error
            self._live.stop()    # the step says where it happened
            self._live = None

    def _render(self) -> Group:
        parts = []
        if self._table is not None:
            parts.append(self._table)
        if self._step:
            parts.append(Text.assemble(("> ", "bold cyan"), (self._step, "bold")))
        parts.append(self._progress)
        return Group(*parts)

    def _write(self, line: str) -> None:
        self.console.file.write(line + "\n")
        self.console.file.flush()

    def step(self, text: str) -> None:
        """What runs now; replaces the previous step."""
        log.info("display.step", text=text)
        self._step = text
        if not self.live:
            self._write(f"== {text}")

    def note(self, text: str) -> None:
        """A result or a message that stays (rich markup on a terminal, plain text elsewhere)."""
        if self.live:
            self.console.print(text)
        else:
            self._write(Text.from_markup(text).plain)

    def bar(self, description: str, total: int | None = None, unit: str = "") -> Bar:
        return Bar(self, description, total, unit)

    def table(self, title: str, headers: list[str], left: tuple[str, ...] = ()) -> None:
        """Starts the table that grows by `add_row`, shown above the step line; numbers to the right,
        the `left` columns (text) to the left."""
        self._table = Table(title=title)
        for header in headers:
            self._table.add_column(header, justify="left" if header in left else "right", overflow="fold")
        if not self.live:
            self._write(f"table: {title}")
            self._write(" | ".join(headers))

    def add_row(self, cells: list[str]) -> None:
        assert self._table is not None, "display.table() first"
        self._table.add_row(*cells)
        if not self.live:
            self._write(" | ".join(cells))
