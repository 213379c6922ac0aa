"""`make bench` (the loop's part): figures for `reconciler run`. Prints numbers; asserts nothing.

1. Commit-to-applied latency: 20 commits to a local repository, each changing one container
   (the demo lab, specs/), seen by the ref watcher and applied by the loop to the in-memory lab:
   p50 and p95 from the end of `git commit` to the end of the pass. Goal: p50 under 2 s.
2. A no-op drift pass inside the daemon (a warm session, no process start-up) for 50 LXC on
   fakepve over HTTPS, 10 ms per request: wall time and requests, against the floor (one
   inventory read plus one config read per guest over the same warm session, made one after
   another). Goals: at most 3 times the floor; at most guests + 6 requests.
3. Resident memory of the daemon after 100 passes over a 200-guest lab (fakepve in its own
   process, so only the daemon is measured). Goal: under 100 MB and not growing.
4. Idle CPU with the default interval (60 s) on the 50-guest lab: the CPU the daemon spends
   waiting (watcher and timers, measured over 10 s) plus one drift pass's CPU every 60 s.
   Goal: under 1% of a core.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from reconciler.engine.apply import HealthPolicy
from reconciler.engine.journal import Journal
from reconciler.engine.run import ApplyOptions
from reconciler.fakes.lab import memory_lab
from reconciler.loop.controller import Controller
from reconciler.loop.events import Outcome, PassRecord, SourceInfo, Trigger
from reconciler.loop.passes import LoopOptions, PassRunner
from reconciler.loop.wiring import Connector, LabConnector
from reconciler.sources.git import GitSource, commit_all, init_repository
from reconciler.sources.watch import RefWatcher
from reconciler.spec.validate import load_and_validate

ROOT = Path(__file__).resolve().parent.parent
LATENCY = 0.010
PASSWORD = "bench-password"


def lab_yaml(guests: int) -> str:
    docs = [
        "kind: Lab\nname: bench\nnodes: [pve1]\nnvml: {enabled: false}\n"
        "proxmox: {url: 'https://127.0.0.1:8006', auth: password, user: root@pam,"
        " secret_env: RECONCILER_PROXMOX_PASSWORD}\n"
    ]
    for i in range(guests):
        docs.append(
            f"kind: Lxc\nname: ct{i}\nnode: pve1\nvmid: {1000 + i}\n"
            "template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst\n"
            "cores: 2\nmemory: 2GiB\nrootfs: {storage: local-lvm, size: 8GiB}\n"
            "network: [{name: eth0, bridge: vmbr0, ip: dhcp}]\nfeatures: {nesting: true}\n"
        )
    return "---\n".join(docs)


def make_loop(repo: Path, state: Path, connector: Connector, *, interval: float, **apply: Any) -> Controller:
    journal = Journal(state / "journal.sqlite")
    source = GitSource(str(repo), branch="main", path="specs", cache=state)
    options = ApplyOptions(health=HealthPolicy(max_timeout=30.0, interval=0.05), **apply)
    runner = PassRunner(source, connector, journal, LoopOptions(interval=interval, apply=options, notes=True))
    return Controller(runner, source=SourceInfo(str(repo), "main", "specs"), interval=interval)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- 1. commit to applied ----------------------------------------------------------------------------------


def bench_commit_latency(commits: int = 20) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as scratch:
        work = Path(scratch)
        shutil.copytree(ROOT / "specs", work / "lab" / "specs")
        init_repository(work / "lab")
        lab = memory_lab(load_and_validate(ROOT / "specs").state, work_dir=work)
        controller = make_loop(work / "lab", work / "state", lab.connector(), interval=3600.0, prober=lab.probe)
        done: dict[str, float] = {}
        seen = threading.Condition()

        def finished(record: PassRecord) -> None:
            with seen:
                if record.revision and record.outcome is Outcome.APPLIED:
                    done[record.revision] = record.started + record.duration
                seen.notify_all()

        controller.subscribe(finished)
        watcher = RefWatcher(work / "lab" / ".git", lambda: controller.request_pass(Trigger.COMMIT))
        thread = threading.Thread(target=controller.serve, daemon=True)
        thread.start()
        latencies: list[float] = []
        try:
            workloads = work / "lab" / "specs" / "workloads.yaml"
            text = workloads.read_text()
            for i in range(commits):
                workloads.write_text(text.replace("max_num_seqs: 32", f"max_num_seqs: {33 + i}"))
                sha = commit_all(work / "lab", f"qwen: {33 + i} sequences")
                committed = time.time()
                with seen:
                    seen.wait_for(lambda sha=sha: sha in done, timeout=30)
                if sha in done:
                    latencies.append(done[sha] - committed)
        finally:
            controller.stop()
            thread.join(30)
            watcher.close()
    latencies.sort()
    p95 = latencies[max(0, int(len(latencies) * 0.95) - 1)] if latencies else float("nan")
    print(
        f"commit to applied, {len(latencies)}/{commits} commits each replacing one container (in-memory lab): "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )


# ---- fakepve, in this process (request log) or its own (memory, CPU) ------------------------------------------


@contextmanager
def fakepve_in_process(pki_dir: Path) -> Iterator[Any]:
    from tests.support.fakepve import USER, LabPve, PveServer, _openssl_pki

    pve = LabPve(user=USER, password=PASSWORD, host="127.0.0.1", port=0)
    pve.time_scale = 0  # tasks end at once while the lab is made; latency needs a time scale of 1 (see below)
    server = PveServer(pve, _openssl_pki(pki_dir))
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def fakepve_process(pki_dir: Path) -> Iterator[dict[str, str]]:
    from tests.support.fakepve import _openssl_pki

    pki = _openssl_pki(pki_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (pki_dir / "guests.json").write_text('{"guests": []}')
    command = [sys.executable, "-m", "fakepve", str(pki_dir / "guests.json"), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--password", PASSWORD, "--time-scale", "0"]
    process = subprocess.Popen(
        [*command, "--cert", pki.cert_file, "--key", pki.key_file],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        process.stdout.readline()  # "fakepve listening on ..."
        yield {"RECONCILER_PROXMOX_URL": f"https://127.0.0.1:{port}", "RECONCILER_PROXMOX_CA": pki.ca_file}
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def guest_lab(guests: int, env: dict[str, str], interval: float) -> Iterator[tuple[Controller, LabConnector]]:
    """A repository of `guests` LXC, and a loop over it that has applied it once (the lab exists)."""
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as scratch:
        work = Path(scratch)
        (work / "lab" / "specs").mkdir(parents=True)
        (work / "lab" / "specs" / "lab.yaml").write_text(lab_yaml(guests))
        init_repository(work / "lab")
        connector = LabConnector(
            {**env, "RECONCILER_PROXMOX_USER": "root@pam", "RECONCILER_PROXMOX_PASSWORD": PASSWORD}
        )
        controller = make_loop(work / "lab", work / "state", connector, interval=interval)
        try:
            first = controller.run_once(Trigger.START)
            assert first is not None
            assert first.outcome is Outcome.APPLIED, first
            yield controller, connector
        finally:
            connector.close()
            controller.runner.journal.close()


# ---- 2. a no-op drift pass ------------------------------------------------------------------------------------


def bench_drift_pass(guests: int = 50) -> None:
    with (
        tempfile.TemporaryDirectory() as pki_dir,
        fakepve_in_process(Path(pki_dir)) as server,
        guest_lab(guests, server.env("password"), 3600.0) as (controller, _),
    ):
        controller.run_once(Trigger.INTERVAL)  # warm
        server.call(setattr, server.pve, "time_scale", 1.0)  # latency is in PVE seconds, scaled by this
        server.call(server.pve.slow_network, LATENCY)
        walls, counts = [], []
        for _ in range(5):
            server.clear_requests()
            start = time.perf_counter()
            record = controller.run_once(Trigger.INTERVAL)
            walls.append(time.perf_counter() - start)
            counts.append(len(server.requests))
            assert record is not None
            assert record.outcome is Outcome.NO_CHANGES, record
        floor = _floor(server, guests, workers=16)  # as many at once as the Proxmox backend reads
        sequential = _floor(server, guests)
        server.call(server.pve.slow_network, 0.0)
    wall = statistics.median(walls)
    print(
        f"no-op drift pass in the daemon, {guests} LXC on fakepve, {LATENCY * 1000:.0f} ms per request: "
        f"{wall * 1000:.0f} ms wall (median of 5), {counts[-1]} requests (goal <= {guests + 6}); "
        f"floor {floor * 1000:.0f} ms ({guests + 1} reads, 16 at once; {sequential * 1000:.0f} ms one after another), "
        f"ratio {wall / floor:.2f} (goal <= 3)"
    )


def _floor(server: Any, guests: int, *, workers: int = 1) -> float:
    """The reads a drift pass cannot avoid, over a warm session: the inventory, then each guest's config."""
    session = requests.Session()
    session.mount("https://", requests.adapters.HTTPAdapter(pool_maxsize=workers))
    tls = {"verify": server.ca_file, "timeout": 30}
    login = {"username": "root@pam", "password": PASSWORD}
    ticket = session.post(f"{server.url}/api2/json/access/ticket", data=login, **tls).json()["data"]
    session.cookies.set("PVEAuthCookie", ticket["ticket"])
    session.get(f"{server.url}/api2/json/version", **tls)  # warm the connection
    start = time.perf_counter()
    session.get(f"{server.url}/api2/json/cluster/resources", params={"type": "vm"}, **tls)
    urls = [f"{server.url}/api2/json/nodes/pve1/lxc/{1000 + i}/config" for i in range(guests)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda url: session.get(url, **tls), urls))
    elapsed = time.perf_counter() - start
    session.close()
    return elapsed


# ---- 3. memory, 4. idle CPU: the `reconciler run` process itself -------------------------------------------------


class Daemon:
    """`reconciler run` on a repository of `guests` LXC, against fakepve in its own process."""

    def __init__(self, work: Path, env: dict[str, str], guests: int, interval: str) -> None:
        (work / "lab" / "specs").mkdir(parents=True)
        (work / "lab" / "specs" / "lab.yaml").write_text(lab_yaml(guests))
        init_repository(work / "lab")
        login = {"RECONCILER_PROXMOX_USER": "root@pam", "RECONCILER_PROXMOX_PASSWORD": PASSWORD}
        command = ["run", "specs", "--repo", str(work / "lab"), "--interval", interval, "--listen", "127.0.0.1:0"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", *command],  # its HTTP server on a free port
            env={**os.environ, **env, **login, "RECONCILER_STATE_DIR": str(work / "state"), "NO_COLOR": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.passes = 0

    def wait_passes(self, count: int) -> None:
        assert self.process.stdout is not None
        while self.passes < count:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the daemon ended")
            if line.startswith("pass "):
                self.passes = int(line.split()[1])

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=60)


def bench_memory(guests: int = 200, passes: int = 100) -> None:
    with tempfile.TemporaryDirectory() as scratch, fakepve_process(Path(scratch)) as env:
        daemon = Daemon(Path(scratch), env, guests, "100ms")
        try:
            marks: dict[int, float] = {}
            for mark in (1, 10, 25, 50, 75, 100):
                daemon.wait_passes(mark)
                marks[mark] = daemon.rss_mib()
            per_pass = daemon.cpu_seconds() / daemon.passes
        finally:
            daemon.stop()
    shown = ", ".join(f"pass {n}: {mib:.0f}" for n, mib in marks.items())
    print(f"`reconciler run` resident memory (MiB), {guests}-guest lab, {passes} passes: {shown}")
    print(f"  (CPU per pass, the first (creating the lab) included: {per_pass * 1000:.0f} ms)")


def bench_idle_cpu(guests: int = 50, window: float = 15.0) -> None:
    with tempfile.TemporaryDirectory() as scratch, fakepve_process(Path(scratch)) as env:
        fast = Daemon(Path(scratch) / "fast", env, guests, "100ms")
        try:
            fast.wait_passes(3)  # created the lab, then no-op passes
            before, counted = fast.cpu_seconds(), fast.passes
            fast.wait_passes(counted + 20)
            per_pass = (fast.cpu_seconds() - before) / (fast.passes - counted)
        finally:
            fast.stop()
        idle = Daemon(Path(scratch) / "idle", env, guests, "60s")
        try:
            idle.wait_passes(1)
            time.sleep(1.0)
            before, wall = idle.cpu_seconds(), time.monotonic()
            time.sleep(window)
            waiting = (idle.cpu_seconds() - before) / (time.monotonic() - wall)
        finally:
            idle.stop()
    total = waiting + per_pass / 60.0
    print(
        f"idle CPU of `reconciler run`, {guests}-guest lab, default 60s interval: "
        f"waiting {waiting * 100:.3f}% of a core (over {window:g}s) "
        f"+ one no-op drift pass ({per_pass * 1000:.0f} ms CPU) per minute "
        f"= {total * 100:.2f}% of a core (goal < 1%)"
    )


def main() -> None:
    os.environ.setdefault("GIT_TERMINAL_PROMPT", "0")
    bench_commit_latency()
    bench_drift_pass()
    bench_memory()
    bench_idle_cpu()


if __name__ == "__main__":
    main()
