"""`make demo`: the reconcile loop, end to end, on the embedded demo lab (specs/) with no lab at hand.

A temporary git repository is made from specs/; the loop runs in this process
exactly as `reconciler run` runs it (a watched local repository, triggers,
drift passes, git notes), against an in-memory Proxmox and Docker that store
configs the way the real ones do, with the GPUs read through the real
nvidia-ml-py from the fake NVML library when a C compiler is there.

It narrates, with the time each step took: the first apply; a commit that
changes a model, applied as soon as it is committed; a change made by hand,
found and corrected by the next drift pass; a commit whose health check fails,
rolled back (with what a notification says); and the loop's status. It ends by
itself and leaves nothing behind (the repository and the lab live in a
temporary folder).
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from reconciler.cli.daemon import print_pass, start_server
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


def run_demo(console: Console, specs: Path = SPECS) -> int:
    loaded = load_and_validate(specs)
    if not loaded.ok:
        console.print(f"[red]{specs} is not valid[/]: run `reconciler validate {specs}`")
        return 1
    if shutil.which("git") is None:
        console.print("[red]the demo needs the git command[/] (the loop follows a git branch)")
        return 1
    with tempfile.TemporaryDirectory(prefix="reconciler-demo-") as scratch:
        work = Path(scratch)
        shutil.copytree(specs, work / "lab" / "specs")
        try:
            init_repository(work / "lab")
        except ReconcilerError as exc:
            console.print(f"[red]cannot make the demo's repository[/]: {exc}")
            return 1
        lab = memory_lab(loaded.state, work_dir=work)
        console.print(f"[dim]a git repository in {work / 'lab'}; Proxmox and Docker in memory; {lab.nvml_note}[/]")
        return _narrate(console, work, lab)


def _narrate(console: Console, work: Path, lab: MemoryLab) -> int:
    repo = work / "lab"
    source = GitSource(str(repo), branch="main", path="specs", cache=work / "state")
    journal = Journal(work / "state" / "journal.sqlite")
    apply = ApplyOptions(health=HealthPolicy(max_timeout=2.0, interval=0.05), prober=lab.probe)
    runner = PassRunner(source, lab.connector(), journal, LoopOptions(interval=INTERVAL, apply=apply))
    controller = Controller(runner, source=SourceInfo(str(repo), "main", "specs"), interval=INTERVAL)
    narrator = _Narrator(console)
    controller.subscribe(narrator)
    controller.subscribe(lambda record: _notify(console, record))
    watcher = RefWatcher(source.git_dir(), lambda: controller.request_pass(Trigger.COMMIT))
    listen = f"127.0.0.1:{_free_port()}"
    server = start_server(controller, listen=listen, token=None)  # MERGE POINT: the HTTP server, when there is one
    thread = threading.Thread(target=controller.serve, name="loop", daemon=True)
    try:
        thread.start()
        ok = _story(console, repo, lab, narrator)
        _show_status(console, controller, listen if server is not None else None)
    finally:
        controller.stop()
        thread.join(30)
        watcher.close()
        if server is not None:
            server.close()
        journal.close()
    console.print(Rule("the demo is over: the loop has stopped and its folder is removed"))
    return 0 if ok else 1


def _story(console: Console, repo: Path, lab: MemoryLab, narrator: _Narrator) -> bool:
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
            f"3. a change made by hand, found by the next drift pass (every {INTERVAL:g}s here, 60s by default)",
            by_hand,
            lambda r: any(d.corrected for d in r.drift),
        )
        and step(
            "4. a commit whose health check fails: qwen-7b moves to port 8001, its probe asks port 9",
            lambda: edit(
                "workloads.yaml",
                "port: 8000",
                "port: 8001\nprobe: {tcp: 'llm.phoenix.lan:9', timeout: 2s}",
                "qwen-7b on 8001 (probe on the wrong port)",
            ),
            _is(Outcome.ROLLED_BACK),
        )
    )


def _is(outcome: Outcome) -> Callable[[PassRecord], bool]:
    return lambda record: record.outcome is outcome


def _notify(console: Console, record: PassRecord) -> None:
    """MERGE POINT: the server's notifiers (webhook, ntfy, Discord) send this; the demo shows what they carry."""
    if record.outcome in (Outcome.ROLLED_BACK, Outcome.ROLLBACK_INCOMPLETE, Outcome.INVALID, Outcome.REFUSED):
        console.print(
            f"[magenta]notification[/]: {record.outcome} {(record.revision or '')[:12]}: {record.message}",
            soft_wrap=True,
        )


def _show_status(console: Console, controller: Controller, listen: str | None) -> None:
    console.print(Rule("5. the loop's status" + (f": curl http://{listen}/status" if listen else "")))
    if listen is not None:
        for path in ("/status", "/metrics"):
            with urllib.request.urlopen(f"http://{listen}{path}", timeout=5) as response:
                body = response.read().decode()
            lines = body.splitlines()
            shown = lines[:40] if path == "/status" else [line for line in lines if line.startswith("reconciler_")][:12]
            console.print(f"$ curl http://{listen}{path}")
            console.print("\n".join(shown), markup=False)
        return
    status = controller.status()
    last = status.last_pass
    summary = {
        "lab": status.lab,
        "source": f"{status.source.repository} {status.source.branch}:{status.source.path}",
        "suspended": status.suspended,
        "head_revision": status.head_revision,
        "applied_revision": status.applied_revision,
        "last_pass": {"number": last.number, "outcome": str(last.outcome), "message": last.message} if last else None,
        "resources": {r.address: r.state for r in status.resources},
        "gpus": [
            f"{g.name} {g.uuid}: {(g.memory_used or 0) >> 20}/{(g.memory_total or 0) >> 20} MiB" for g in status.gpus
        ],
    }
    console.print("[dim](the HTTP server is not in this build: the loop's status as the server would serve it)[/]")
    console.print(json.dumps(summary, indent=2), markup=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
