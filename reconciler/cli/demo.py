"""`make demo`: the reconcile loop, end to end, on the embedded demo lab (specs/) with no lab at hand.

Who calls it: `reconciler demo` (`make demo`). A temporary git repository is
made from specs/; the loop runs in this process exactly as `reconciler run`
runs it (a watched local repository, triggers, drift passes, git notes, the
HTTP server on a free loopback port, the Lab's notifications), against an
in-memory Proxmox and Docker that store configs the way the real ones do, with
the GPUs read through the real nvidia-ml-py from the fake NVML library when a
C compiler is there. The demo's copy of the Lab sends a generic webhook
notification to a small receiver on loopback, which the demo prints.

It narrates, with the time each step took: the first apply; a commit that
changes a model, applied as soon as it is committed; a change made by hand,
found and corrected by the next drift pass; a commit whose health check fails,
rolled back, with the notification it sent; and `curl` of /status and
/metrics. It ends by itself and leaves nothing behind: the loop, the server,
the receiver and the notifier are stopped, and the temporary folder removed.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.rule import Rule

from reconciler.cli.daemon import daemon_services, print_pass
from reconciler.engine.apply import HealthPolicy
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions
from reconciler.errors import ReconcilerError
from reconciler.fakes.lab import MemoryLab, memory_lab
from reconciler.loop.controller import Controller
from reconciler.loop.events import Outcome, PassRecord, SourceInfo, Trigger
from reconciler.loop.passes import LoopOptions, PassRunner
from reconciler.sources.git import GitSource, commit_all, init_repository
from reconciler.sources.watch import RefWatcher
from reconciler.spec.validate import load_and_validate

__all__ = ["run_demo"]

SPECS = Path("specs")
INTERVAL = 2.0  # the drift interval of the demo (60 s by default)
PATIENCE = 30.0  # how long the demo waits for a pass before it gives up
RECEIVER_PATH = "/reconciler"
METRICS_SHOWN = r'^reconciler_(passes_total\{outcome="(applied|rolled-back)"|drifted_resources|gpu_memory_total)'


class _Narrator:
    """Prints passes as they end and lets the demo wait for the one it expects."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.records: list[PassRecord] = []
        self._changed = threading.Condition()

    def __call__(self, record: PassRecord) -> None:
        print_pass(self.console, record)
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()

    def wait(self, predicate: Callable[[PassRecord], bool]) -> PassRecord | None:
        start = len(self.records)
        deadline = time.monotonic() + PATIENCE
        with self._changed:
            while time.monotonic() < deadline:
                found = next((r for r in self.records[start:] if predicate(r)), None)
                if found is not None:
                    return found
                self._changed.wait(timeout=0.1)
        return None


class _Receiver(BaseHTTPRequestHandler):
    """The demo's notification receiver: keeps each JSON body posted to it."""

    server: _Inbox

    def do_POST(self) -> None:
        length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
        body = self.rfile.read(length)
        self.send_response(204)
        self.end_headers()
        with self.server.arrived:
            self.server.bodies.append(body)
            self.server.arrived.notify_all()

    def log_message(self, *_args: object) -> None:
        """Quiet: the demo prints what arrived itself."""


class _Inbox(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Receiver)
        self.bodies: list[bytes] = []
        self.arrived = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{RECEIVER_PATH}"

    def wait(self, count: int) -> dict[str, Any] | None:
        """The `count`-th notification received (1-based), waiting up to PATIENCE seconds."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.bodies) >= count, timeout=PATIENCE)
            return json.loads(self.bodies[count - 1]) if len(self.bodies) >= count else None


@contextmanager
def _inbox() -> Iterator[_Inbox]:
    inbox = _Inbox()
    thread = threading.Thread(target=inbox.serve_forever, args=(0.1,), name="demo receiver", daemon=True)
    thread.start()
    try:
        yield inbox
    finally:
        inbox.shutdown()
        inbox.server_close()
        thread.join(5)


def run_demo(console: Console, specs: Path = SPECS) -> int:
    loaded = load_and_validate(specs)
    if not loaded.ok:
        console.print(f"[red]{specs} is not valid[/]: run `reconciler validate {specs}`")
        return 1
    if shutil.which("git") is None:
        console.print("[red]the demo needs the git command[/] (the loop follows a git branch)")
        return 1
    with tempfile.TemporaryDirectory(prefix="reconciler-demo-") as scratch, _inbox() as inbox:
        work = Path(scratch)
        shutil.copytree(specs, work / "lab" / "specs")
        _add_notification(work / "lab" / "specs", inbox.url)
        try:
            init_repository(work / "lab")
        except ReconcilerError as exc:
            console.print(f"[red]cannot make the demo's repository[/]: {exc}")
            return 1
        lab = memory_lab(loaded.state, work_dir=work)
        console.print(f"[dim]a git repository in {work / 'lab'}; Proxmox and Docker in memory; {lab.nvml_note}[/]")
        return _narrate(console, work, lab, inbox)


def _add_notification(spec: Path, url: str) -> None:
    """The demo's Lab notifies its receiver of failures, as a lab's would notify ntfy or a chat."""
    for path in sorted(spec.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        if "\nkind: Lab\n" in f"\n{text}":
            notify = f"notifications:\n  - {{kind: generic, url: '{url}', events: [failed, rolled-back]}}\n"
            path.write_text(text.rstrip("\n") + "\n" + notify, encoding="utf-8")
            return


def _narrate(console: Console, work: Path, lab: MemoryLab, inbox: _Inbox) -> int:
    repo = work / "lab"
    source = GitSource(str(repo), branch="main", path="specs", cache=work / "state")
    journal = Journal(work / "state" / "journal.sqlite")
    apply = ApplyOptions(
        health=HealthPolicy(max_timeout=2.0, interval=0.05), prober=lab.probe, ssh_connect=lab.ssh_connect
    )
    runner = PassRunner(source, lab.connector(), journal, LoopOptions(interval=INTERVAL, apply=apply))
    controller = Controller(runner, source=SourceInfo(str(repo), "main", "specs"), interval=INTERVAL)
    narrator = _Narrator(console)
    controller.subscribe(narrator)
    thread = threading.Thread(target=controller.serve, name="loop", daemon=True)
    try:
        with daemon_services(controller, listen="127.0.0.1:0", environ={}) as server:
            assert server is not None
            watcher = RefWatcher(source.git_dir(), lambda: controller.request_pass(Trigger.COMMIT))
            console.print(f"[dim]the loop's HTTP server: {server.url}; notifications go to {inbox.url}[/]")
            try:
                thread.start()
                ok = _story(console, repo, lab, narrator, inbox) and _show_http(console, server.url)
            finally:
                controller.stop()
                thread.join(30)
                watcher.close()
    finally:
        journal.close()
    console.print(Rule("the end: loop, server and receiver stopped, folder removed"))
    return 0 if ok else 1


def _story(console: Console, repo: Path, lab: MemoryLab, narrator: _Narrator, inbox: _Inbox) -> bool:
    def step(title: str, action: Callable[[], str | None], expect: Callable[[PassRecord], bool]) -> bool:
        console.print(Rule(title))
        started = time.monotonic()
        sha = action()
        record = narrator.wait(lambda r: expect(r) and (sha is None or r.revision == sha))
        if record is None:
            console.print(f"[red]no pass did it within {PATIENCE:g}s[/]")
            return False
        console.print(f"[bold]took {time.monotonic() - started:.2f}s[/] from the action to the end of the pass")
        return True

    def edit(file: str, old: str, new: str, message: str) -> str:
        path = repo / "specs" / file
        path.write_text(path.read_text().replace(old, new, 1))
        return commit_all(repo, message)

    def by_hand() -> None:
        lab.proxmox.guests[955].config["memory"] = "1024"
        console.print("someone sets lxc/llm's memory to 1 GiB in the Proxmox UI")

    return (
        step("1. the loop starts: the first apply, from an empty lab", lambda: None, _is(Outcome.APPLIED))
        and step(
            "2. a commit: qwen-7b serves 16 sequences instead of 32",
            lambda: edit("workloads.yaml", "max_num_seqs: 32", "max_num_seqs: 16", "qwen-7b: 16 sequences"),
            _is(Outcome.APPLIED),
        )
        and step(
            f"3. a change by hand, corrected by the next drift pass (every {INTERVAL:g}s here)",
            by_hand,
            lambda r: any(d.corrected for d in r.drift),
        )
        and step(
            "4. a commit whose health check fails (qwen-7b's probe asks port 9)",
            lambda: edit(
                "workloads.yaml",
                "port: 8000",
                "port: 8001\nprobe: {tcp: 'llm.phoenix.lan:9', timeout: 2s}",
                "qwen-7b on 8001 (probe on the wrong port)",
            ),
            _is(Outcome.ROLLED_BACK),
        )
        and _show_notification(console, inbox)
    )


def _is(outcome: Outcome) -> Callable[[PassRecord], bool]:
    return lambda record: record.outcome is outcome


def _show_notification(console: Console, inbox: _Inbox) -> bool:
    """What the rollback's notification carried, as the receiver got it (the Lab asks for failures only)."""
    started = time.monotonic()
    document = inbox.wait(1)
    if document is None:
        console.print(f"[red]no notification arrived within {PATIENCE:g}s[/]")
        return False
    console.print(
        f"[magenta]the notification it sent[/] (a generic webhook, received {time.monotonic() - started:.2f}s"
        f" after the pass): POST {inbox.url}"
    )
    shown = {key: document.get(key) for key in ("lab", "events", "pass", "trigger", "outcome", "changes", "message")}
    shown["revision"] = (document.get("revision") or "")[:12]
    console.print(_compact(shown), markup=False, soft_wrap=True)
    return True


def _show_http(console: Console, url: str) -> bool:
    """`curl` of /status (abbreviated) and of a few /metrics lines, over real HTTP."""
    console.print(Rule("5. what the loop serves over HTTP"))
    started = time.monotonic()
    status = json.loads(_get(f"{url}/status"))
    last, gpus = status.get("last_pass") or {}, status.get("gpus") or []
    abbreviated = {
        "result": status["result"],
        "applied_revision": (status["applied_revision"] or "")[:12],
        "attempted_revision": (status["attempted_revision"] or "")[:12],
        "suspended": status["suspended"],
        "last_pass": {key: last.get(key) for key in ("number", "trigger", "outcome")},
        "resources": {r["address"]: r["state"] for r in status["resources"]},
        "gpus": [
            f"{g['uuid'][:12]}: {(g['memory_used'] or 0) >> 20}/{(g['memory_total'] or 0) >> 20} MiB used" for g in gpus
        ],
    }
    console.print(f"$ curl -s {url}/status    [dim](abbreviated: {len(status)} keys, revisions cut to 12)[/]")
    console.print(_compact(abbreviated), markup=False, soft_wrap=True)
    shown = re.compile(METRICS_SHOWN)
    lines = [line for line in _get(f"{url}/metrics").splitlines() if shown.match(line)]
    console.print(f"$ curl -s {url}/metrics | grep -E '{METRICS_SHOWN}'", markup=False)
    console.print("\n".join(lines), markup=False, soft_wrap=True)
    console.print(f"[bold]took {time.monotonic() - started:.2f}s[/] for both requests")
    return bool(lines)


def _compact(document: dict[str, Any]) -> str:
    """JSON with one top-level key a line: short enough to read in a terminal."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in document.items()]
    return "{\n" + ",\n".join(lines) + "\n}"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())
