"""Notifications against a real receiver on loopback: what each kind sends, and that a slow, hanging
or dead receiver never holds up the loop.

The receiver is a real HTTP server in the test. The loop is the in-memory LoopControl, which calls
its listeners on its own thread as the real loop does; "reconciliation goes on" is asserted as
ordering and state (the pass finished while the receiver had not answered), never as a duration.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reconciler.loop.events import DriftReport, Outcome
from reconciler.loop.notify import Notifier, events_of
from reconciler.spec.loader import load_tree
from reconciler.spec.models import Notification, NotifyEvent
from tests.support.loopdouble import LoopDouble, record

WAIT = 30.0  # seconds a test waits for something that should happen much sooner


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A loopback HTTP server that records what it is sent; `gate` holds every answer until set."""

    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Condition = field(default_factory=threading.Condition)
    status: int = 204
    answered: int = 0  # requests answered so far

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def wait_for(self, count: int) -> list[Received]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, WAIT), f"{len(self.received)} arrived"
            return list(self.received)

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            me = holder[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with me.arrived:
                me.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                me.arrived.notify_all()
            me.gate.wait(WAIT)
            with me.arrived:
                me.answered += 1
            self.send_response(me.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    made = Receiver(server)
    made.gate.set()
    holder.append(made)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield made
    if thread.is_alive():
        made.stop()


def wait_for_log(caplog: pytest.LogCaptureFixture, message: str, count: int = 1) -> list[logging.LogRecord]:
    done = threading.Event()
    for _ in range(int(WAIT / 0.05)):
        found = [r for r in caplog.records if r.getMessage() == message]
        if len(found) >= count:
            return found
        done.wait(0.05)
    pytest.fail(f"no {count} log records {message!r}: {[r.getMessage() for r in caplog.records]}")


def log_fields(entry: logging.LogRecord) -> dict[str, object]:
    return dict(entry.fields)  # type: ignore[attr-defined]


DRIFT = (DriftReport("lxc/llm", ("memory",), "correct", corrected=True),)


def test_a_generic_webhook_gets_the_pass_as_json_with_its_bearer_token(receiver: Receiver) -> None:
    spec = Notification(kind="generic", url=f"{receiver.url}/hook", token_env="HOOK_TOKEN")
    notifier = Notifier("homelab", [spec], environ={"HOOK_TOKEN": "s3cret"})
    loop = LoopDouble()
    loop.subscribe(notifier)
    loop.finish_pass(record(3, revision="b" * 40, changes=("update lxc/llm", "create container/llm/vllm"), drift=DRIFT))
    (got,) = receiver.wait_for(1)
    notifier.close()
    assert got.path == "/hook"
    assert got.headers["authorization"] == "Bearer s3cret"
    document = json.loads(got.body)
    assert document["lab"] == "homelab"
    assert document["revision"] == "b" * 40
    assert document["outcome"] == "applied"
    assert document["events"] == ["applied", "drift"]
    assert document["changes"] == ["update lxc/llm", "create container/llm/vllm"]
    assert document["drift"] == [{"address": "lxc/llm", "fields": ["memory"], "policy": "correct", "corrected": True}]
    assert document["pass"] == 3


def test_ntfy_gets_a_titled_text_message(receiver: Receiver) -> None:
    spec = Notification(kind="ntfy", url=f"{receiver.url}/homelab-alerts", token_env="NTFY_TOKEN")
    notifier = Notifier("homelab", [spec], environ={"NTFY_TOKEN": "tk_abc"})
    notifier(record(1, outcome=Outcome.ROLLED_BACK, revision="c" * 40, message="health check of vllm failed"))
    (got,) = receiver.wait_for(1)
    notifier.close()
    assert got.path == "/homelab-alerts"
    assert got.headers["authorization"] == "Bearer tk_abc"
    assert got.headers["title"].startswith("lab homelab: rolled-back at cccccccccccc")
    assert got.headers["priority"] == "high"
    text = got.body.decode()
    assert "update lxc/llm" in text
    assert "health check of vllm failed" in text


def test_discord_gets_a_message_that_cannot_ping_anyone(receiver: Receiver) -> None:
    spec = Notification(kind="discord", url_env="DISCORD_WEBHOOK_URL")
    notifier = Notifier("homelab", [spec], environ={"DISCORD_WEBHOOK_URL": f"{receiver.url}/api/webhooks/1/tok"})
    many = tuple(f"update container/h/c{i}" for i in range(500))
    notifier(record(1, changes=many, message="@everyone look"))
    (got,) = receiver.wait_for(1)
    notifier.close()
    assert got.path == "/api/webhooks/1/tok"
    body = json.loads(got.body)
    assert body["allowed_mentions"] == {"parse": []}
    assert len(body["content"]) <= 2000
    assert "... and 480 more" in body["content"]


def test_only_the_wanted_events_are_sent(receiver: Receiver) -> None:
    failures = Notification(kind="generic", url=f"{receiver.url}/failures", events=["failed", "rolled-back"])
    notifier = Notifier("homelab", [failures], environ={})
    notifier(record(1, outcome=Outcome.APPLIED))
    notifier(record(2, outcome=Outcome.NO_CHANGES, drift=DRIFT))
    notifier(record(3, outcome=Outcome.INVALID, message="lxc.yaml:3: unknown field"))
    (got,) = receiver.wait_for(1)
    notifier.close()
    assert json.loads(got.body)["pass"] == 3
    assert len(receiver.received) == 1


def test_the_same_failure_twice_in_a_row_is_sent_once(receiver: Receiver) -> None:
    spec = Notification(kind="generic", url=f"{receiver.url}/x")
    notifier = Notifier("homelab", [spec], environ={})
    notifier(record(1, outcome=Outcome.ERROR, revision="d" * 40, message="proxmox unreachable"))
    notifier(record(2, outcome=Outcome.ERROR, revision="d" * 40, message="proxmox unreachable"))  # retried
    notifier(record(3, outcome=Outcome.NO_CHANGES, revision="d" * 40))
    notifier(
        record(4, outcome=Outcome.ERROR, revision="d" * 40, message="proxmox unreachable")
    )  # again, after a good one
    got = receiver.wait_for(2)
    notifier.close()
    assert [json.loads(r.body)["pass"] for r in got] == [1, 4]


def test_events_of_every_outcome() -> None:
    expected = {
        Outcome.NO_CHANGES: set(),
        Outcome.APPLIED: {NotifyEvent.APPLIED},
        Outcome.ROLLED_BACK: {NotifyEvent.ROLLED_BACK},
        Outcome.ROLLBACK_INCOMPLETE: {NotifyEvent.ROLLED_BACK, NotifyEvent.FAILED},
        Outcome.INVALID: {NotifyEvent.FAILED},
        Outcome.REFUSED: {NotifyEvent.FAILED},
        Outcome.SUSPENDED: set(),
        Outcome.ERROR: {NotifyEvent.FAILED},
    }
    assert set(expected) == set(Outcome)
    for outcome, events in expected.items():
        assert events_of(record(1, outcome=outcome)) == events
        assert events_of(record(1, outcome=outcome, drift=DRIFT)) == events | {NotifyEvent.DRIFT}


def test_a_slow_then_dead_receiver_never_holds_up_the_loop(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler")
    spec = Notification(kind="generic", url=f"{receiver.url}/slow", timeout="60s")
    notifier = Notifier("homelab", [spec], environ={}, queue_size=2)
    loop = LoopDouble()
    loop.subscribe(notifier)

    receiver.gate.clear()  # slow: the receiver takes requests and answers none until the gate opens
    loop.finish_pass(record(1, revision="1" * 40))
    receiver.wait_for(1)
    for number in range(2, 8):
        loop.finish_pass(record(number, revision=str(number) * 40))
    # Every pass finished and was recorded while the first notification was still unanswered.
    assert receiver.answered == 0
    assert loop.status().passes == 7
    drops = [r for r in caplog.records if r.getMessage() == "notification dropped"]
    assert len(drops) == 4  # one in flight, two queued, four dropped: all said before the passes returned
    assert {log_fields(r)["reason"] for r in drops} == {"queue full"}

    receiver.gate.set()  # the receiver catches up: the first and the two queued arrive
    got = receiver.wait_for(3)
    assert [json.loads(r.body)["pass"] for r in got] == [1, 2, 3]
    wait_for_log(caplog, "notification sent", count=3)

    receiver.stop()  # down: nothing listens on the port any more
    loop.finish_pass(record(8, revision="8" * 40))
    loop.finish_pass(record(9, revision="9" * 40))
    assert loop.status().passes == 9
    failures = wait_for_log(caplog, "notification failed", count=2)
    assert {log_fields(r)["error"] for r in failures} == {"ConnectionError"}
    notifier.close()


def test_a_receiver_that_never_answers_times_out_and_the_next_one_goes(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler")
    receiver.gate.clear()
    notifier = Notifier("homelab", [Notification(kind="generic", url=f"{receiver.url}/hang", timeout="0.3s")])
    notifier(record(1, revision="1" * 40))
    receiver.wait_for(1)
    (failed,) = wait_for_log(caplog, "notification failed")
    assert log_fields(failed)["error"] == "ReadTimeout"
    receiver.gate.set()
    notifier(record(2, revision="2" * 40))
    assert json.loads(receiver.wait_for(2)[1].body)["pass"] == 2
    notifier.close()


def test_a_refusing_receiver_is_logged_with_its_status(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reconciler")
    receiver.status = 429
    notifier = Notifier("homelab", [Notification(kind="generic", url=f"{receiver.url}/x")])
    notifier(record(1))
    (refused,) = wait_for_log(caplog, "notification refused")
    assert log_fields(refused)["status"] == 429
    notifier.close()


def test_secrets_never_reach_the_log(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="reconciler")
    secret_url = f"{receiver.url}/api/webhooks/123/very-secret-token"
    spec = Notification(kind="discord", url_env="DISCORD_URL")
    notifier = Notifier("homelab", [spec], environ={"DISCORD_URL": secret_url})
    notifier(record(1))
    receiver.wait_for(1)
    wait_for_log(caplog, "notification sent")
    receiver.stop()
    notifier(record(2, revision="2" * 40))
    wait_for_log(caplog, "notification failed")
    notifier.close()
    assert "very-secret-token" not in caplog.text
    assert all("very-secret-token" not in repr(getattr(r, "fields", "")) for r in caplog.records)


def test_a_target_whose_secret_is_missing_is_disabled_and_said(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reconciler")
    specs = [
        Notification(kind="discord", url_env="NO_SUCH_VARIABLE"),
        Notification(kind="ntfy", url="https://ntfy.invalid/topic", token_env="NO_TOKEN"),
        Notification(kind="generic", url_env="BAD_URL"),
    ]
    notifier = Notifier("homelab", specs, environ={"BAD_URL": "file:///etc/passwd"})
    notifier(record(1))
    notifier.close()
    disabled = [log_fields(r) for r in caplog.records if r.getMessage() == "notification target disabled"]
    assert [d.get("missing_variable") or d.get("variable") for d in disabled] == [
        "NO_SUCH_VARIABLE",
        "NO_TOKEN",
        "BAD_URL",
    ]


def test_configure_swaps_targets(receiver: Receiver) -> None:
    first = Notification(kind="generic", url=f"{receiver.url}/first")
    second = Notification(kind="generic", url=f"{receiver.url}/second")
    notifier = Notifier("homelab", [first], environ={})
    notifier(record(1, revision="1" * 40))
    receiver.wait_for(1)
    notifier.configure("homelab", [second], environ={})
    notifier(record(2, revision="2" * 40))
    got = receiver.wait_for(2)
    notifier.close()
    assert [r.path for r in got] == ["/first", "/second"]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"kind": "generic", "url": "ftp://host/x"}, "http:// or https://"),
        ({"kind": "generic", "url": "https://user:pw@host/x"}, "credentials"),
        ({"kind": "generic", "url": "https:///x"}, "no host"),
        ({"kind": "generic", "url": "https://host/a b"}, "without spaces"),
        ({"kind": "generic", "url": "https://host:99999/"}, "not a valid URL"),
        ({"kind": "generic"}, "exactly one"),
        ({"kind": "generic", "url": "https://h/", "url_env": "X"}, "exactly one"),
        ({"kind": "discord", "url": "https://discord.com/api/webhooks/1/x"}, "url_env"),
        ({"kind": "generic", "url": "https://h/", "timeout": "5m"}, "at most 60s"),
        ({"kind": "generic", "url": "https://h/", "events": []}, "at least 1"),
        ({"kind": "generic", "url": "https://h/", "token_env": "a-b"}, "not an environment variable name"),
        # A spec must not send the reconciler's own credentials to a URL it names.
        ({"kind": "generic", "url": "https://h/", "token_env": "RECONCILER_PROXMOX_TOKEN"}, "own credentials"),
        ({"kind": "discord", "url_env": "RECONCILER_PROXMOX_PASSWORD"}, "own credentials"),
        ({"kind": "ntfy", "url": "https://h/", "token_env": "DOCKER_HOST"}, "own credentials"),
        ({"kind": "email", "url": "https://h/"}, "generic"),
    ],
)
def test_notification_specs_are_validated(fields: dict[str, object], problem: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        Notification.model_validate(fields)
    assert problem in str(caught.value)


def test_a_lab_spec_configures_its_notifiers(tmp_path: Path, receiver: Receiver, repo_root: Path) -> None:
    shutil.copytree(repo_root / "specs", tmp_path / "specs")
    lab_file = tmp_path / "specs" / "lab.yaml"
    lab_file.write_text(
        lab_file.read_text()
        + f"notifications:\n  - kind: generic\n    url: {receiver.url}/lab\n    events: [rolled-back]\n"
        + "  - kind: discord\n    url_env: LAB_TEST_DISCORD_URL\n    events: [drift]\n"
    )
    loaded = load_tree(tmp_path / "specs")
    assert loaded.ok, loaded.diagnostics
    notifier = Notifier.from_lab(loaded.state.lab, environ={"LAB_TEST_DISCORD_URL": f"{receiver.url}/discord"})
    notifier(record(1, outcome=Outcome.ROLLED_BACK, revision="1" * 40))
    notifier(record(2, outcome=Outcome.NO_CHANGES, revision="1" * 40, drift=DRIFT))
    got = receiver.wait_for(2)
    notifier.close()
    assert sorted(r.path for r in got) == ["/discord", "/lab"]
    assert json.loads(next(r for r in got if r.path == "/lab").body)["lab"] == loaded.state.lab.name


def test_a_bad_notification_url_is_a_diagnostic_with_its_line(tmp_path: Path, repo_root: Path) -> None:
    shutil.copytree(repo_root / "specs", tmp_path / "specs")
    lab_file = tmp_path / "specs" / "lab.yaml"
    before = lab_file.read_text()
    lab_file.write_text(before + "notifications:\n  - kind: generic\n    url: javascript:alert(1)\n")
    loaded = load_tree(tmp_path / "specs")
    assert not loaded.ok
    (problem,) = [d for d in loaded.diagnostics if "notifications" in d.message]
    assert "http:// or https://" in problem.message
    assert problem.position is not None
    assert problem.position.line == before.count("\n") + 2


def test_closing_with_drain_sends_what_is_queued_and_a_closed_notifier_starts_nothing(receiver: Receiver) -> None:
    """`run --once` and a stopping daemon close with drain: the last pass's notification still goes out."""
    receiver.gate.clear()  # the receiver holds its answers: the notifications queue up behind the first
    notifier = Notifier("homelab", [Notification(kind="generic", url=receiver.url)])
    loop = LoopDouble()
    loop.subscribe(notifier)
    for number in (1, 2, 3):
        loop.finish_pass(record(number, revision=f"{number}" * 40))
    receiver.wait_for(1)
    releaser = threading.Timer(0.2, receiver.gate.set)
    releaser.start()
    notifier.close(timeout=WAIT, drain=True)
    releaser.join()
    assert [json.loads(r.body)["pass"] for r in receiver.received] == [1, 2, 3]
    before = set(threading.enumerate())
    notifier.configure("homelab", [Notification(kind="generic", url=receiver.url)])
    loop.finish_pass(record(4, revision="4" * 40))
    assert set(threading.enumerate()) - before == set(), "a closed notifier starts no worker"
    assert len(receiver.received) == 3


@pytest.mark.parametrize("token", ["tok€n-secret-123", "tok\nX-Evil: 1", "two words"])
def test_a_token_no_http_header_can_carry_disables_its_target_and_says_why(
    token: str, receiver: Receiver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="reconciler")
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    specs = [
        Notification(kind="generic", url=f"{receiver.url}/bad", token_env="BAD_TOKEN"),
        Notification(kind="generic", url=f"{receiver.url}/good", token_env="GOOD_TOKEN"),
    ]
    notifier = Notifier("homelab", specs, environ={"BAD_TOKEN": token, "GOOD_TOKEN": "good-token-1234"})
    notifier(record(1))
    assert [r.path for r in receiver.wait_for(1)] == ["/good"]
    notifier.close()
    assert died == [], "a sending thread died"
    disabled = [log_fields(r) for r in caplog.records if r.getMessage() == "notification target disabled"]
    assert [(d.get("variable"), "token" in str(d.get("problem"))) for d in disabled] == [("BAD_TOKEN", True)]
    assert "secret-123" not in caplog.text


def test_notification_secrets_are_scrubbed_wherever_they_would_show() -> None:
    """A receiver's token or a Discord URL is a secret of the process: any text that quotes it is scrubbed."""
    from reconciler import redact

    url = "https://discord.example/api/webhooks/42/n0t1fy-url-secret"
    token = "ntfy-bearer-secret-5521"
    specs = [
        Notification(kind="discord", url_env="LAB_DISCORD_URL"),
        Notification(kind="ntfy", url="https://ntfy.example/lab", token_env="LAB_NTFY_TOKEN"),
    ]
    notifier = Notifier("homelab", specs, environ={"LAB_DISCORD_URL": url, "LAB_NTFY_TOKEN": token})
    notifier.close()
    shown = redact.scrub(f"POST {url} failed; Authorization: Bearer {token}; token={token}")
    assert "n0t1fy-url-secret" not in shown and token not in shown
