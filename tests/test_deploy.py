"""The systemd unit in deploy/: systemd itself checks it, and every option it passes exists in `reconciler run`."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "reconciler.service"


def exec_start() -> list[str]:
    line = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (systemd is not a CI component)")
    # The unit names the installed binary; here it is the one of this checkout.
    binary = Path(sys.executable).parent / "reconciler"
    unit = tmp_path / "reconciler.service"
    unit.write_text(UNIT.read_text().replace("/opt/reconciler/bin/reconciler", str(binary)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reconciler.service" not in result.stderr  # no warning about the unit itself


def test_the_unit_runs_the_daemon_with_options_it_has() -> None:
    command = exec_start()
    assert command[0] == "/opt/reconciler/bin/reconciler" and command[1] == "run"
    help_text = subprocess.run(
        [sys.executable, "-m", "reconciler", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout
    for option in (arg for arg in command[2:] if arg.startswith("--")):
        assert option in help_text, option
    assert "--once" not in command  # the unit runs the daemon, not one pass
    text = UNIT.read_text()
    assert "KillSignal=SIGTERM" in text and "TimeoutStopSec=" in text
