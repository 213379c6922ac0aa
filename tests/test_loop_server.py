"""The loop and its HTTP server together, over real HTTP, as `reconciler run` wires them.

The daemon is built by the same functions `reconciler run` uses (`build_controller`, `daemon_services`:
the server, the Lab's notifiers and the hook that re-reads them on a new revision) around the in-memory
lab of the demo, with real git repositories (a local one, and a bare one as a remote through file://).
Requests go over loopback HTTP; the `reconcile`, `suspend` and `resume` commands run as subprocesses.
The last tests run `reconciler run` itself as a process, one of them against fakepve and a real Docker
engine. Assertions are on the lab, /status, /metrics and what a loopback receiver got.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli.daemon import DaemonSettings, build_controller, daemon_services
from reconciler.engine.apply import HealthPolicy
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions
from reconciler.fakes.lab import MemoryLab, memory_lab
from reconciler.loop.controller import Controller
from reconciler.loop.events import Outcome, PassRecord, Trigger
from reconciler.server import ServerHandle, WebhookSecrets
from reconciler.server.webhooks import sign
from reconciler.sources.git import GitSource
from reconciler.spec.validate import load_and_validate
from tests.support.gitrepo import GitRepo, make_repo
from tests.support.http import Answer, call

pytestmark = pytest.mark.git

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
LLM = 955
TOKEN = "api-t0ken-for-tests"
SECRET = b"webhook-secret-for-tests"
DEADLINE = 60.0


@dataclass
class Daemon:
    controller: Controller
    server: ServerHandle
    lab: MemoryLab
    records: list[PassRecord]

    @property
    def listen(self) -> str:
        host, port = self.server.address
        return f"{host}:{port}"

    def get(self, path: str) -> Answer:
        return call(self.server.address, "GET", path)

    def status(self) -> dict[str, Any]:
        answer = self.get("/status")
        assert answer.status == 200
        document: dict[str, Any] = answer.json()
        return document

    def wait_for(self, predicate: Callable[[PassRecord], bool], *, after: int = 0) -> PassRecord:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            found = next((r for r in self.records[after:] if predicate(r)), None)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no such pass within {DEADLINE}s: {self.records}")

    def memory(self) -> str:
        return str(self.lab.proxmox.guests[LLM].config["memory"])


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """`start_daemon(repository)`: the daemon on the in-memory lab, serving on a free loopback port."""
    with ExitStack() as stack:

        def start(repository: str) -> Daemon:
            state = tmp_path / "state"
            lab = memory_lab(load_and_validate(SPECS).state, work_dir=tmp_path / "lab-work")
            apply = ApplyOptions(
                health=HealthPolicy(max_timeout=1.0, interval=0.02), prober=lab.probe, ssh_connect=lab.ssh_connect
            )
            source = GitSource(repository, branch="main", path="specs", cache=state)
            settings = DaemonSettings(source=source, state_dir=state, interval=3600.0, apply=apply)
            journal = Journal(state / "journal.sqlite")
            stack.callback(journal.close)
            controller = build_controller(settings, journal, lab.connector())
            records: list[PassRecord] = []
            controller.subscribe(records.append)
            secrets = WebhookSecrets(github=SECRET, gitea=SECRET, gitlab=SECRET)
            server = stack.enter_context(
                daemon_services(controller, listen="127.0.0.1:0", api_token=TOKEN, webhooks=secrets, environ={})
            )
            assert server is not None
            thread = threading.Thread(target=controller.serve, name="loop")
            thread.start()
            stack.callback(thread.join, 30)
            stack.callback(controller.stop)
            return Daemon(controller, server, lab, records)

        yield start


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return make_repo(tmp_path / "lab", SPECS)


def bare_remote(repo: GitRepo, folder: Path) -> str:
    subprocess.run(["git", "clone", "-q", "--bare", str(repo.path), str(folder)], check=True)
    return f"file://{folder}"


def push_event(provider: str, body: bytes, *, secret: bytes = SECRET, delivery: str = "1") -> dict[str, str]:
    if provider == "github":
        return {
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": f"sha256={sign(secret, body)}",
            "Content-Type": "application/json",
        }
    if provider == "gitlab":
        return {
            "X-Gitlab-Event": "Push Hook",
            "X-Gitlab-Event-UUID": delivery,
            "X-Gitlab-Token": secret.decode(),
            "Content-Type": "application/json",
        }
    return {
        "X-Gitea-Event": "push",
        "X-Gitea-Delivery": delivery,
        "X-Gitea-Signature": sign(secret, body),
        "Content-Type": "application/json",
    }


def cli(verb: str, daemon: Daemon, *, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", verb, "--listen", daemon.listen],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "RECONCILER_API_TOKEN": token, "NO_COLOR": "1"},
    )


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = "^" + re.escape(name) + (re.escape("{" + wanted + "}") if wanted else "") + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


# ---- webhooks: a push makes the daemon fetch its remote and apply the new commit ---------------------------


@pytest.mark.parametrize("provider", ["github", "gitea", "gitlab"])
def test_a_signed_push_webhook_fetches_the_remote_and_applies_the_commit(
    repo: GitRepo, tmp_path: Path, start_daemon: Callable[[str], Daemon], provider: str
) -> None:
    url = bare_remote(repo, tmp_path / "remote.git")
    daemon = start_daemon(url)
    first = daemon.wait_for(lambda r: r.trigger is Trigger.START)
    assert (first.outcome, first.revision) == (Outcome.APPLIED, repo.head()), first.message

    repo.edit("guests.yaml", "memory: 32GiB", "memory: 30GiB")
    second = repo.commit("llm: 30 GiB")
    repo.git("push", "-q", str(tmp_path / "remote.git"), "main")
    body = json.dumps({"object_kind": "push", "ref": "refs/heads/main", "after": second}).encode()

    # Unsigned, wrongly signed, or malformed: refused, and no pass is queued (the next pass is the manual one).
    assert call(daemon.server.address, "POST", f"/hooks/{provider}", body=body).status == 401
    forged = push_event(provider, body, secret=b"not-the-secret", delivery="forged")
    assert call(daemon.server.address, "POST", f"/hooks/{provider}", body=body, headers=forged).status == 401
    junk = b'{"object_kind": "push", "ref": 42}'
    answer = call(daemon.server.address, "POST", f"/hooks/{provider}", body=junk, headers=push_event(provider, junk))
    assert answer.status == 400
    assert daemon.memory() == str(32 * 1024)
    assert daemon.status()["applied_revision"] == first.revision

    # A push to another branch is acknowledged and ignored.
    other = json.dumps({"object_kind": "push", "ref": "refs/heads/dev", "after": second}).encode()
    answer = call(
        daemon.server.address,
        "POST",
        f"/hooks/{provider}",
        body=other,
        headers=push_event(provider, other, delivery="2"),
    )
    assert answer.status == 200

    answer = call(daemon.server.address, "POST", f"/hooks/{provider}", body=body, headers=push_event(provider, body))
    assert answer.status == 202, answer.body
    applied = daemon.wait_for(lambda r: r.revision == second)
    assert (applied.number, applied.trigger, applied.outcome) == (2, Trigger.WEBHOOK, Outcome.APPLIED), applied
    assert applied.changes == ("update lxc/llm",)
    assert daemon.memory() == str(30 * 1024)
    status = daemon.status()
    assert (status["applied_revision"], status["head_revision"], status["result"]) == (second, second, "applied")
    assert status["source"]["repository"] == url

    # The same delivery again is a replay: refused.
    replay = call(daemon.server.address, "POST", f"/hooks/{provider}", body=body, headers=push_event(provider, body))
    assert replay.status == 409


# ---- the control commands against the running daemon -------------------------------------------------------


def test_suspend_reconcile_and_resume_commands_steer_the_running_daemon(
    repo: GitRepo, start_daemon: Callable[[str], Daemon]
) -> None:
    daemon = start_daemon(str(repo.path))
    daemon.wait_for(lambda r: r.outcome is Outcome.APPLIED)

    refused = cli("suspend", daemon, token="wrong")
    assert refused.returncode == 1 and "refused the token" in refused.stderr
    assert daemon.status()["suspended"] is False

    suspended = cli("suspend", daemon)
    assert suspended.returncode == 0, suspended.stderr
    assert daemon.status()["suspended"] is True
    daemon.lab.proxmox.guests[LLM].config["memory"] = "1024"  # by hand, while the loop is suspended

    seen = len(daemon.records)
    asked = cli("reconcile", daemon)
    assert asked.returncode == 0, asked.stderr
    record = daemon.wait_for(lambda r: True, after=seen)
    assert (record.trigger, record.outcome) == (Trigger.MANUAL, Outcome.SUSPENDED)
    assert [(d.address, d.fields, d.corrected) for d in record.drift] == [("lxc/llm", ("memory",), False)]
    assert daemon.memory() == "1024", "a suspended loop writes nothing"
    status = daemon.status()
    assert status["result"] == "suspended"
    assert {r["address"]: r["state"] for r in status["resources"]}["lxc/llm"] == "drifted"
    assert status["drift"] == [{"address": "lxc/llm", "fields": ["memory"], "policy": "correct", "corrected": False}]

    seen = len(daemon.records)
    resumed = cli("resume", daemon)
    assert resumed.returncode == 0, resumed.stderr
    record = daemon.wait_for(lambda r: True, after=seen)
    assert record.outcome is Outcome.APPLIED, record.message
    assert [(d.address, d.corrected) for d in record.drift] == [("lxc/llm", True)]
    assert daemon.memory() == str(32 * 1024)
    assert daemon.status()["suspended"] is False

    metrics = daemon.get("/metrics")
    assert metrics.status == 200
    text = metrics.body.decode()
    assert metric(text, "reconciler_passes_total", outcome="applied") == 2.0
    assert metric(text, "reconciler_passes_total", outcome="suspended") == 1.0
    assert metric(text, "reconciler_passes_total", outcome="rolled-back") == 0.0
    assert metric(text, "reconciler_pass_duration_seconds_count") == 3.0
    assert metric(text, "reconciler_drifted_resources", corrected="true") == 1.0
    assert metric(text, "reconciler_drifted_resources", corrected="false") == 0.0
    assert metric(text, "reconciler_suspended") == 0.0
    assert f'applied="{repo.head()}"' in text


# ---- notifications from the real loop ----------------------------------------------------------------------


class _Inbox(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receiver)
        self.bodies: list[dict[str, Any]] = []
        self.arrived = threading.Condition()
        self.gate = threading.Event()  # cleared: the receiver takes each request and holds its answer
        self.gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def wait(self, count: int) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.bodies) >= count, timeout=DEADLINE), self.bodies
            return list(self.bodies)


class _Receiver(BaseHTTPRequestHandler):
    server: _Inbox

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with self.server.arrived:
            self.server.bodies.append(body)
            self.server.arrived.notify_all()
        self.server.gate.wait(DEADLINE)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        """Quiet."""


@pytest.fixture
def inboxes() -> Iterator[Callable[[], _Inbox]]:
    made: list[tuple[_Inbox, threading.Thread]] = []

    def make() -> _Inbox:
        inbox = _Inbox()
        thread = threading.Thread(target=inbox.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        made.append((inbox, thread))
        return inbox

    yield make
    for inbox, thread in made:
        inbox.gate.set()
        inbox.shutdown()
        inbox.server_close()
        thread.join(5)


def _notify_to(repo: GitRepo, url: str, events: str = "", timeout: str = "") -> None:
    lab = (repo.path / "specs" / "lab.yaml").read_text().split("\nnotifications:")[0].rstrip("\n")
    extra = (f", events: [{events}]" if events else "") + (f", timeout: {timeout}" if timeout else "")
    repo.write("lab.yaml", f"{lab}\nnotifications:\n  - {{kind: generic, url: '{url}'{extra}}}\n")


def test_a_rolled_back_commit_is_notified_and_a_new_revision_changes_the_targets(
    repo: GitRepo, start_daemon: Callable[[str], Daemon], inboxes: Callable[[], _Inbox]
) -> None:
    first_inbox, second_inbox = inboxes(), inboxes()
    _notify_to(repo, first_inbox.url)
    first = repo.commit("notify the first receiver of everything")
    daemon = start_daemon(str(repo.path))
    daemon.wait_for(lambda r: r.outcome is Outcome.APPLIED)
    # The Lab's targets are read before the first pass is notified: its own apply reaches the receiver.
    (applied,) = first_inbox.wait(1)
    assert (applied["lab"], applied["outcome"], applied["events"], applied["revision"]) == (
        "phoenix",
        "applied",
        ["applied"],
        first,
    )
    assert "create lxc/llm" in applied["changes"]

    _notify_to(repo, second_inbox.url, events="rolled-back")
    moved = repo.commit("notify the second receiver of rollbacks only")
    daemon.controller.request_pass(Trigger.COMMIT)
    daemon.wait_for(lambda r: r.revision == moved and r.outcome is Outcome.NO_CHANGES)

    repo.edit("workloads.yaml", "port: 8000", "port: 8001\nprobe: {tcp: 'llm.phoenix.lan:9', timeout: 1s}")
    failing = repo.commit("qwen-7b: a probe on the wrong port")
    daemon.controller.request_pass(Trigger.COMMIT)
    rolled = daemon.wait_for(lambda r: r.revision == failing)
    assert rolled.outcome is Outcome.ROLLED_BACK, rolled.message
    (notified,) = second_inbox.wait(1)
    assert (notified["outcome"], notified["events"], notified["revision"]) == ("rolled-back", ["rolled-back"], failing)
    assert notified["changes"] == ["replace container/llm/qwen-7b"]
    assert "health check failed" in notified["message"]
    assert len(first_inbox.bodies) == 1, "the first receiver left the Lab with the revision that removed it"
    assert daemon.status()["applied_revision"] == moved


def test_a_receiver_that_hangs_and_then_is_gone_never_holds_up_the_loop(
    repo: GitRepo, start_daemon: Callable[[str], Daemon], inboxes: Callable[[], _Inbox]
) -> None:
    inbox = inboxes()
    inbox.gate.clear()  # it takes every notification and never answers
    _notify_to(repo, inbox.url, timeout="1s")
    repo.commit("notify a receiver that will hang")
    daemon = start_daemon(str(repo.path))
    daemon.wait_for(lambda r: r.outcome is Outcome.APPLIED)
    assert inbox.wait(1)[0]["outcome"] == "applied"  # taken, and held

    def drift_pass(key: str, value: str) -> None:
        seen = len(daemon.records)
        daemon.lab.proxmox.guests[LLM].config[key] = value
        daemon.controller.request_pass(Trigger.MANUAL)
        record = daemon.wait_for(lambda r: True, after=seen)
        assert (record.outcome, [(d.fields, d.corrected) for d in record.drift]) == (
            Outcome.APPLIED,
            [((key,), True)],
        ), record
        assert (daemon.memory(), str(daemon.lab.proxmox.guests[LLM].config["cores"])) == (str(32 * 1024), "8")

    # Each pass notifies its drift (a different one each time, so none is skipped as a repeat) and goes on.
    for key, value in (("memory", "1024"), ("cores", "2"), ("memory", "2048")):
        drift_pass(key, value)
    inbox.shutdown()
    inbox.server_close()  # now nothing listens there at all
    for key, value in (("cores", "4"), ("memory", "4096")):
        drift_pass(key, value)
    assert daemon.status()["passes"] == 6


# ---- `reconciler run` as a process -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_is_free(port: int) -> bool:
    """Whether a server could listen there again (as the daemon's own does: TIME_WAIT connections aside)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
        return True


def _wait_http(address: tuple[str, int], path: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    end = time.monotonic() + 300
    last: Any = None
    while time.monotonic() < end:
        try:
            answer = call(address, "GET", path)
        except OSError:
            answer = None
        if answer is not None and answer.status == 200:
            last = answer.json()
            if predicate(last):
                return dict(last)
        time.sleep(0.1)
    raise AssertionError(f"GET {path} never satisfied the test; last answer: {last}")


def _start_run(repo: GitRepo, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", "specs", "--repo", str(repo.path), *args],
        cwd=ROOT,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(daemon: subprocess.Popen[str], stop: signal.Signals = signal.SIGTERM) -> tuple[str, str]:
    daemon.send_signal(stop)
    try:
        return daemon.communicate(timeout=120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_run_with_its_server_exit_0_and_frees_the_port(
    repo: GitRepo, tmp_path: Path, stop: signal.Signals
) -> None:
    """No lab answers (Proxmox on a closed port): the daemon keeps serving, logs JSON, and stops cleanly."""
    port = _free_port()
    password = "pw-that-must-never-be-logged"
    env = {
        "RECONCILER_STATE_DIR": str(tmp_path / "state"),
        "RECONCILER_PROXMOX_URL": "https://127.0.0.1:1",
        "RECONCILER_PROXMOX_PASSWORD": password,
        "RECONCILER_API_TOKEN": TOKEN,
        # Not ssh://: the ssh client writes its own complaints to the daemon's stderr, which is not a log line.
        "RECONCILER_DOCKER_HOST_LLM": f"unix://{tmp_path}/none.sock",
        "RECONCILER_DOCKER_HOST_IMAGE": f"unix://{tmp_path}/none.sock",
    }
    daemon = _start_run(repo, env, "--listen", f"127.0.0.1:{port}", "--log-format", "json")
    try:
        status = _wait_http(("127.0.0.1", port), "/status", lambda s: s["result"] is not None)
        assert status["result"] == "error" and status["applied_revision"] is None
        assert status["head_revision"] == repo.head()
        assert _wait_http(("127.0.0.1", port), "/healthz", lambda s: True)["status"] == "ok"
    finally:
        out, err = _stop(daemon, stop)
    assert daemon.returncode == 0, err
    assert _port_is_free(port)
    assert out == "", "with --log-format json, stdout stays empty: every event is a JSON line on stderr"
    events = [json.loads(line) for line in err.splitlines()]
    messages = [event["message"] for event in events]
    assert "http server listening" in messages and "daemon stopped" in messages
    finished = next(event for event in events if event["message"] == "pass finished")
    assert (finished["outcome"], finished["revision"], finished["trigger"]) == ("error", repo.head(), "start")
    assert finished["logger"] == "reconciler.loop" and finished["level"] == "info"
    assert events[messages.index("stop requested")]["signal"] == stop.name
    assert password not in err and TOKEN not in err


def test_listen_none_runs_without_a_server_and_bad_listen_addresses_are_refused(repo: GitRepo, tmp_path: Path) -> None:
    env = {"RECONCILER_STATE_DIR": str(tmp_path / "state"), "RECONCILER_PROXMOX_URL": "https://127.0.0.1:1"}
    for bad in ("localhost", "127.0.0.1:99999", "example.com:80"):
        refused = _start_run(repo, env, "--listen", bad)
        out, err = refused.communicate(timeout=120)
        assert refused.returncode == 1 and "is not an IP address and port" in err, err
    daemon = _start_run(repo, env, "--listen", "none", "--interval", "1h")
    try:
        end = time.monotonic() + 120
        while not (tmp_path / "state" / "journal.sqlite").exists() and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        out, err = _stop(daemon)
    assert daemon.returncode == 0, err
    assert "no HTTP API (--listen none)" in out and "http server listening" not in err
    # Text: what stdout prints (start, passes, stop) is not said again on stderr.
    assert out.rstrip().endswith("stopped") and "daemon stopped" not in err and "daemon started" not in err


@pytest.mark.docker
@pytest.mark.fakepve
@pytest.mark.nvml
def test_run_against_fakepve_and_docker_is_steered_and_seen_over_http(
    tmp_path: Path, real_lab: Any, docker_client: Any
) -> None:
    from tests.test_apply_real import pve_get, pve_put

    repo = make_repo(tmp_path / "real", SPECS)
    lab = real_lab(repo.path / "specs", stand_in=True)
    port = _free_port()
    address = ("127.0.0.1", port)
    env = {**lab.env, "RECONCILER_STATE_DIR": str(lab.state_dir), "RECONCILER_API_TOKEN": TOKEN}
    daemon = _start_run(repo, env, "--listen", f"127.0.0.1:{port}", "--health-timeout", "20", "--interval", "1h")
    config = "/nodes/phoenix/lxc/955/config"

    def ask(verb: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "reconciler", verb, "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "RECONCILER_API_TOKEN": TOKEN},
        )
        assert done.returncode == 0, done.stderr

    try:
        status = _wait_http(address, "/status", lambda s: s["result"] is not None)
        assert (status["result"], status["applied_revision"]) == ("applied", repo.head()), status["last_pass"]
        ask("suspend")
        pve_put(lab.pve, config, memory=2048)
        lab.pve.clear_requests()
        ask("reconcile")
        status = _wait_http(address, "/status", lambda s: s["passes"] >= 2)
        assert status["result"] == "suspended"
        assert status["drift"] == [
            {"address": "lxc/llm", "fields": ["memory"], "policy": "correct", "corrected": False}
        ]
        assert lab.pve.writes() == [] and pve_get(lab.pve, config)["memory"] == 2048
        ask("resume")
        status = _wait_http(address, "/status", lambda s: s["passes"] >= 3)
        assert status["result"] == "applied" and status["suspended"] is False
        assert pve_get(lab.pve, config)["memory"] == 32 * 1024
        metrics = call(address, "GET", "/metrics").body.decode()
        assert metric(metrics, "reconciler_passes_total", outcome="applied") == 2.0
        assert metric(metrics, "reconciler_passes_total", outcome="suspended") == 1.0
        assert metric(metrics, "reconciler_drifted_resources", corrected="true") == 1.0
        assert re.search(r"^reconciler_gpu_memory_total_bytes\{gpu=.*\} \d", metrics, re.MULTILINE), metrics
    finally:
        out, err = _stop(daemon)
    assert daemon.returncode == 0, err
    assert _port_is_free(port)
    assert "pass 1 (start)" in out and "stopped" in out
