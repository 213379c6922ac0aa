"""`reconciler run` refuses bad options before touching anything; `reconcile`/`suspend`/`resume` speak the
daemon's API contract (POST /api/v1/VERB with the bearer token) to a real HTTP endpoint on loopback."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tests.support.gitrepo import make_repo

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})},
    )


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--interval", "banana"], "--interval 'banana': not a duration"),
        (["--interval", "0s"], "is too short"),
        (["--interval", "-5s"], "--interval '-5s'"),
        (["--verify-signatures"], "--verify-signatures needs --keyring"),
        (["--log-format", "xml"], "give text or json"),
        (["--verify-signatures", "--keyring", "/nonexistent/keyring", "--once"], "keyring /nonexistent/keyring"),
    ],
)
def test_run_refuses_bad_options_with_a_message(tmp_path: Path, options: list[str], says: str) -> None:
    repo = make_repo(tmp_path / "lab", ROOT / "specs")
    result = cli("run", "specs", "--repo", str(repo.path), "--state-dir", str(tmp_path / "state"), *options)
    assert result.returncode == 1, result.stdout + result.stderr
    assert says in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


class _Daemon(http.server.BaseHTTPRequestHandler):
    """The API's contract as the server serves it: POST /api/v1/{reconcile,suspend,resume}, bearer token."""

    token = "t0ken-for-tests"
    seen: ClassVar[list[tuple[str, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"ok": True, "verb": self.path.rsplit("/", 1)[-1]}).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        """Quiet."""


@pytest.fixture
def daemon_api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Daemon)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Daemon.seen = []
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("verb", ["reconcile", "suspend", "resume"])
def test_client_commands_post_with_the_bearer_token(daemon_api: str, verb: str) -> None:
    result = cli(verb, "--listen", daemon_api, env={"RECONCILER_API_TOKEN": _Daemon.token})
    assert result.returncode == 0, result.stderr
    assert _Daemon.seen == [(f"/api/v1/{verb}", f"Bearer {_Daemon.token}")]


def test_client_commands_say_what_went_wrong(daemon_api: str, tmp_path: Path) -> None:
    wrong = cli("suspend", "--listen", daemon_api, env={"RECONCILER_API_TOKEN": "wrong"})
    assert wrong.returncode == 1 and "refused the token" in wrong.stderr
    assert "wrong" not in wrong.stderr.replace("went wrong", "")
    unset = cli("suspend", "--listen", daemon_api, env={"RECONCILER_API_TOKEN": ""})
    assert unset.returncode == 1 and "RECONCILER_API_TOKEN is not set" in unset.stderr
    assert len(_Daemon.seen) == 1  # no request without a token
    nobody = cli("reconcile", "--listen", "127.0.0.1:1", env={"RECONCILER_API_TOKEN": "x"})
    assert nobody.returncode == 1 and "no daemon answers at 127.0.0.1:1" in nobody.stderr
    assert "Traceback" not in wrong.stderr + unset.stderr + nobody.stderr


def test_run_once_without_repo_follows_the_repository_holding_path(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "lab", ROOT / "specs")
    repo.edit("guests.yaml", "memory: 32GiB", "memory: lots")
    sha = repo.commit("invalid: nothing reaches a backend")
    result = cli("run", str(repo.path / "specs"), "--once", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"pass 1 (start) {sha[:12]}: invalid" in result.stdout
    assert "specs/guests.yaml:9:9: Lxc/llm: error: memory" in result.stdout
    assert "reconciler: invalid" in repo.git("notes", "--ref=reconciler", "show", sha)


def test_client_commands_read_the_token_from_a_file_as_the_daemon_does(daemon_api: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(_Daemon.token + "\n")
    result = cli("reconcile", "--listen", daemon_api, env={"RECONCILER_API_TOKEN_FILE": str(token_file)})
    assert result.returncode == 0, result.stderr
    assert _Daemon.seen == [("/api/v1/reconcile", f"Bearer {_Daemon.token}")]
