"""The terminal display (es_ray/console.py) and the log file (logs.to_file), without a stack."""

import io
import logging
import os
import sys
import warnings

import pytest
from rich.text import Text

from es_ray.console import Display, parse_progress
from es_ray.logs import get_logger, to_file


def plain_display(every_s: float = 0.0) -> tuple[Display, io.StringIO]:
    out = io.StringIO()  # not a terminal: plain lines
    return Display(out, every_s=every_s), out


def test_plain_mode_prints_one_line_per_step_progress_and_table_row():
    display, out = plain_display(every_s=3600)  # only the first and the last progress line
    assert not display.live
    with display:
        display.step("loading documents")
        with display.bar("upsert", total=10, unit="items") as bar:
            for _ in range(10):
                bar.advance()
        display.note("[bold]done[/bold]")
        display.table("quality", ["round", "nDCG@10"])
        display.add_row(["0", "0.8105"])
        display.add_row(["1", "0.8205"])
    lines = out.getvalue().splitlines()
    assert lines[0] == "== loading documents"
    assert lines[1].startswith("upsert: 0/10 items (")
    assert lines[2].startswith("upsert: 10/10 items (")
    assert lines[3] == "done"  # markup gone, no escape codes
    assert lines[4:] == ["table: quality", "round | nDCG@10", "0 | 0.8105", "1 | 0.8205"]
    assert "\x1b" not in out.getvalue()


def test_plain_progress_lines_read_back_with_counts_and_eta():
    display, out = plain_display(every_s=0)
    with display, display.bar("upsert", total=1000, unit="items") as bar:
        bar.update(250)
        bar.update(250)  # no move: no new line (until QUIET_S)
    lines = out.getvalue().splitlines()
    middle = next(line for line in lines if line.startswith("upsert: 250/"))
    assert "25%" in middle and "ETA" in middle
    # the end repeats no line that says the same count
    assert [parse_progress(line) for line in lines] == [("upsert", 0, 1000), ("upsert", 250, 1000)]
    assert parse_progress("upsert: 3/? items (1 s)") == ("upsert", 3, None)
    assert parse_progress("2026-12-01 22:18:24,238 INFO logging_progress.py:233 -- Tasks: 0") is None


def test_live_mode_shows_the_table_that_grew_and_leaves_python_streams_alone():
    out, stdout, stderr = io.StringIO(), sys.stdout, sys.stderr
    with Display(out, live=True) as display:
        assert display.console.is_terminal
        assert sys.stdout is stdout and sys.stderr is stderr  # stray prints go to the log, not the screen
        display.table("quality", ["round", "model"])
        display.add_row(["0", "v1"])
        display.add_row(["1", "v2"])
        with display.bar("search", total=2, unit="queries") as bar:
            bar.advance(2)
    text = Text.from_ansi(out.getvalue()).plain
    assert "quality" in text and "v1" in text and "v2" in text
    assert "search: 2/2 queries" in text  # the finished bar's result line


def test_log_lines_go_to_the_file_and_not_to_the_terminal(tmp_path, capfd):
    path = tmp_path / "logs" / "demo.log"
    with to_file(path) as terminal, Display(terminal) as display:
        display.step("round 1")
        get_logger("es_ray.test").info("test.event", items=3)
        logging.getLogger("some.library").warning("a library says hello")
        warnings.warn("XDG_RUNTIME_DIR is not set", RuntimeWarning, stacklevel=1)
        print("a stray print")  # noqa: T201
        os.write(2, b"core_worker.cc:2465: written by C++ to fd 2\n")
    out, err = capfd.readouterr()
    assert out == "== round 1\n" and err == ""
    logged = path.read_text()
    for line in ('"event": "test.event"', '"items": 3', "a library says hello", "XDG_RUNTIME_DIR is not set",
                 "a stray print", "core_worker.cc:2465"):
        assert line in logged
    # afterwards the streams are the terminal's again
    print("after")  # noqa: T201
    assert capfd.readouterr().out == "after\n"


def test_verbose_shows_the_log_lines_too(tmp_path, capfd):
    path = tmp_path / "up.log"
    with to_file(path, verbose=True) as terminal, Display(terminal) as display:
        display.step("Ray head")
        get_logger("es_ray.test").info("test.verbose")
    out, err = capfd.readouterr()
    assert "== Ray head" in out
    assert '"event": "test.verbose"' in err and '"event": "test.verbose"' in path.read_text()


@pytest.mark.parametrize("verbose", [False, True])
def test_an_error_inside_is_logged_and_the_streams_come_back(tmp_path, capfd, verbose):
    path = tmp_path / "cycle.log"
    with pytest.raises(RuntimeError), to_file(path, verbose):
        raise RuntimeError("boom")
    print("back")  # noqa: T201
    assert "back" in capfd.readouterr().out


def test_a_jobs_progress_lines_move_the_followers_bar_and_the_rest_goes_to_the_log(capsys):
    from es_ray.demo.loop import follow_progress

    display, out = plain_display(every_s=0)
    with display, display.bar("upsert", total=None, unit="items") as bar:
        follow = follow_progress(bar, "upsert")
        # chunks as `ray job logs` hands them out: lines cut anywhere, Ray Data's own lines in between
        follow("2026-12-01 22:18:14,191\tINFO logging_progress.py:225 -- Total Progress: 0/?\nups")
        assert bar.completed == 0
        follow("ert: 120/200 items (60%, 3 s, ETA 2 s)\nreindex: 5/9 items (1 s)\n")
        assert (bar.completed, bar.total) == (120, 200)  # another bar's line does not move this one
    assert "Total Progress" in capsys.readouterr().out  # passed on to stdout: the log file in a command
    assert "Total Progress" not in out.getvalue()
