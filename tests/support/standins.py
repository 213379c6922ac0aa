"""Stand-in package tools for provisioning tests: `apt-get`, `dpkg`, `systemctl` and friends that record
what they were asked and change nothing.

`make_standins(folder, log)` writes executable shell scripts into `folder`; each appends one line,
`NAME ARGS...`, to `log` and exits 0. Put the folder first on PATH of the SSH session (the sshd
fixture's `set_env`) and a built-in step runs exactly as in a guest, against a package manager that
only takes notes. `curl -o FILE` writes a stand-in NVIDIA installer (a script that records how it was
run); `curl` without `-o` prints an apt source line; `gpg -o FILE` writes an empty keyring.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["STANDINS", "make_standins", "recorded"]

STANDINS = ("apt-get", "dpkg", "systemctl", "service", "nvidia-ctk")

_RECORD = 'printf "%s\\n" "$(basename "$0") $*" >> "$STANDIN_LOG"\n'
_CURL = (
    "#!/bin/sh\n" + _RECORD + 'out=""\nwhile [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
    'if [ -n "$out" ]; then\n'
    '  printf \'#!/bin/sh\\nprintf "%%s\\\\n" "installer $(basename "$0") $*" >> "$STANDIN_LOG"\\n\' > "$out"\n'
    "else\n"
    "  echo 'deb https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /'\n"
    "fi\n"
)
_GPG = (
    "#!/bin/sh\n"
    + _RECORD
    + 'out=""\nwhile [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\ncat > /dev/null\n[ -z "$out" ] || : > "$out"\n'
)


def make_standins(folder: Path) -> Path:
    """Write the stand-ins into `folder` (made if missing); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in STANDINS:
        (folder / name).write_text("#!/bin/sh\n" + _RECORD)
    (folder / "curl").write_text(_CURL)
    (folder / "gpg").write_text(_GPG)
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def recorded(log: Path) -> list[str]:
    """What the stand-ins were asked, one call a line, in order."""
    return log.read_text().splitlines() if log.exists() else []
