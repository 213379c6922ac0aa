"""Speed figures for the daemon's HTTP server and notifiers. Prints numbers; asserts nothing.

`python -m benchmarks.server`:
1. A signed GitHub push over loopback HTTP until the pass is requested: p50 and p95 of 200.
2. `/status` and `/metrics` for a lab of 200 resources and 8 GPUs: p50 and p95 of 200 scrapes.
3. The time a notifier with three targets takes on the loop's thread per pass, with the receiver
   answering and with the receiver hung (the queue fills and drops).
4. CPU the idle server uses over 5 s (goal: under 1% of a core).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from reconciler.loop.events import GpuStatus, ResourceStatus
from reconciler.loop.notify import Notifier
from reconciler.server import WebhookSecrets, serve
from reconciler.server.webhooks import sign
from reconciler.spec.models import Notification
from tests.support.http import call
from tests.support.loopdouble import LoopDouble, record

SECRET = b"bench-secret"


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[int(len(ordered) * 0.95) - 1]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms (n={len(ordered)})"


def timed(action: Callable[[], object], times: int) -> list[float]:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def webhook_latency(loop: LoopDouble, address: tuple[str, int]) -> None:
    counter = iter(range(10**9))

    def push() -> None:
        body = json.dumps({"ref": "refs/heads/main", "after": f"{next(counter):040d}"}).encode()
        headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={sign(SECRET, body)}"}
        before = len(loop.requests)
        assert call(address, "POST", "/hooks/github", body=body, headers=headers).status == 202
        assert len(loop.requests) == before + 1

    print(f"webhook to pass requested: {percentiles(timed(push, 200))}")


def scrape_latency(address: tuple[str, int]) -> None:
    for path in ("/status", "/metrics"):
        size = len(call(address, "GET", path).body)
        samples = timed(lambda path=path: call(address, "GET", path), 200)  # type: ignore[misc]
        print(f"GET {path} ({size} bytes): {percentiles(samples)}")


def pass_listener_samples(notifier: Notifier) -> list[float]:
    """How long each of 500 distinct passes keeps the loop's thread in the notifier."""
    samples = []
    for number in range(500):
        finished = record(number, revision=f"{number:040d}")
        started = time.perf_counter()
        notifier(finished)
        samples.append(time.perf_counter() - started)
    return samples


def notifier_cost() -> None:
    gate = threading.Event()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            gate.wait(30)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    specs = [Notification(kind=kind, url=f"{url}/{kind}") for kind in ("generic", "ntfy")]
    specs.append(Notification(kind="discord", url_env="BENCH_DISCORD"))
    for state in ("answering", "hung"):
        if state == "answering":
            gate.set()
        else:
            gate.clear()
        notifier = Notifier("bench", specs, environ={"BENCH_DISCORD": f"{url}/discord"})
        samples = pass_listener_samples(notifier)
        print(f"notifier on the loop's thread, receiver {state}: {percentiles(samples)}")
        notifier.close(timeout=0.1)
    gate.set()
    server.shutdown()
    server.server_close()


def idle_cpu() -> None:
    started_cpu, started = time.process_time(), time.monotonic()
    time.sleep(5)
    share = (time.process_time() - started_cpu) / (time.monotonic() - started)
    print(f"idle server CPU: {share * 100:.3f}% of a core")


def main() -> None:
    logging.getLogger("reconciler").setLevel(logging.ERROR)  # the hung receiver's drops would flood the output
    gpus = tuple(GpuStatus(f"gpu{i}", f"GPU-{i}", 2**30, 2**34, 50.0, 60.0, 200.0) for i in range(8))
    loop = LoopDouble(gpus=gpus)
    resources = tuple(ResourceStatus(f"lxc/ct{i}", "in-sync") for i in range(200))
    loop.finish_pass(record(1), resources=resources)
    with serve(loop, listen="127.0.0.1:0", api_token=None, webhooks=WebhookSecrets(github=SECRET)) as handle:
        webhook_latency(loop, handle.address)
        scrape_latency(handle.address)
        idle_cpu()
    notifier_cost()


if __name__ == "__main__":
    main()
