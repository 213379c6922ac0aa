"""Live progress of long waits: the terminal line (rich) and what a hostile detail cannot do to it."""

from __future__ import annotations

import io

from rich.console import Console

from reconciler.cli.progress import live_progress, progress_line
from reconciler.engine.health import Progress


def test_off_a_terminal_there_is_no_live_line() -> None:
    out = io.StringIO()
    with live_progress(Console(file=out, force_terminal=False)) as sink:
        assert sink is None
    assert out.getvalue() == ""


def test_on_a_terminal_the_latest_phase_and_elapsed_time_are_shown() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with live_progress(console) as sink:
        assert sink is not None
        sink(Progress("infer/qwen-32b", "starting", 42.4, "GET http://infer.lan:8002/health: 503, still loading"))
    assert "infer/qwen-32b  starting  42s  GET http://infer.lan:8002/health: 503, still loading" in out.getvalue()


def test_a_servers_words_are_text_not_markup_or_terminal_control() -> None:
    line = progress_line(Progress("h/m", "ready", 1.0, "serves '[red]x[/]\x1b[2J', not 'm'" + "y" * 500))
    assert line.plain.startswith("h/m  ready  1s  serves '[red]x[/][2J', not 'm'")
    assert "\x1b" not in line.plain and len(line.plain) < 200
    assert not line.spans, "no style was taken from the text"
