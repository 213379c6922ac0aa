"""Log output: a constant message plus fields, as human lines or JSON lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from reconciler.logs import LogFormat, configure_logging, fields


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("reconciler")
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


def emit(fmt: LogFormat) -> str:
    stream = io.StringIO()
    configure_logging(fmt, stream=stream)
    log = logging.getLogger("reconciler.loop")
    log.info("pass finished", extra=fields(outcome="applied", revision="3f2a", seconds=1.25, changes=["a b", "c"]))
    log.debug("not shown at info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("pass failed", extra=fields(message='said "no"', time="clash"))
    return stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_the_message_and_the_fields() -> None:
    lines = emit(LogFormat.JSON).splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "pass finished"
    assert first["level"] == "info"
    assert first["logger"] == "reconciler.loop"
    assert (first["outcome"], first["revision"], first["seconds"]) == ("applied", "3f2a", 1.25)
    assert first["changes"] == ["a b", "c"]
    assert first["time"].endswith("Z")
    assert second["message"] == "pass failed"
    assert second["field_time"] == "clash"  # a field never overwrites the fixed keys
    assert second["time"] != "clash"
    assert "ValueError: boom" in second["error"]


@pytest.mark.usefixtures("restore_logging")
def test_human_lines_read_as_message_then_key_values() -> None:
    text = emit(LogFormat.HUMAN)
    first = text.splitlines()[0]
    assert "INFO  reconciler.loop: pass finished outcome=applied revision=3f2a seconds=1.25" in first
    assert 'changes=["a b","c"]' in first
    assert 'message="said \\"no\\""' in text
    assert "ValueError: boom" in text


@pytest.mark.usefixtures("restore_logging")
def test_configuring_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("json", stream=first)
    configure_logging("human", stream=second)
    logging.getLogger("reconciler.x").warning("hello")
    assert first.getvalue() == ""
    assert "hello" in second.getvalue()


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        configure_logging("xml")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fmt", list(LogFormat))
def test_a_hostile_field_cannot_forge_a_log_line(fmt: LogFormat) -> None:
    stream = io.StringIO()
    configure_logging(fmt, stream=stream)
    forged = 'main\n2026-01-01T00:00:00Z ERROR reconciler: {"level": "error", "message": "forged"}\r\x1b[2J\u2028next'

    logging.getLogger("reconciler.server.app").info("webhook ignored", extra=fields(branch=forged))
    lines = stream.getvalue().rstrip("\n").split("\n")
    assert len(lines) == 1
    if fmt is LogFormat.JSON:
        assert json.loads(lines[0])["branch"] == forged
    else:
        assert not any(char in lines[0] for char in "\x1b\r\u2028")
        assert lines[0].endswith('next"')


@pytest.mark.parametrize("fmt", list(LogFormat))
@pytest.mark.usefixtures("restore_logging")
def test_no_secret_the_process_holds_reaches_a_log_line(fmt: LogFormat) -> None:
    from reconciler import redact

    secret = "pve-token-secret-7f3e9a"
    redact.register(secret)
    stream = io.StringIO()
    configure_logging(fmt, stream=stream)
    log = logging.getLogger("reconciler.loop")
    log.warning(f"request failed with {secret}", extra=fields(url=f"https://root:{secret}@pve1:8006", token=secret))
    try:
        raise RuntimeError(f"answer echoed Authorization: PVEAPIToken=root@pam!ci={secret}")
    except RuntimeError:
        log.exception("pass failed")
    text = stream.getvalue()
    assert "request failed" in text and "pass failed" in text
    assert secret not in text
