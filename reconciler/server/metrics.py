"""Prometheus metrics for `/metrics`: the only module that imports prometheus_client.

Who calls it: `server.serve()` makes one `LoopMetrics` per server, subscribes `observe` to the loop
(pass durations and outcomes are counted as passes finish), and renders it on each scrape. Everything
else (revision, drift, resources, GPUs) is read from `LoopControl.status()` at scrape time, so a
scrape never shows a value older than the loop's own snapshot. It uses its own CollectorRegistry,
never the process-global one, so two servers (or tests) never share or clash over series.

    reconciler_pass_duration_seconds        histogram  how long passes took
    reconciler_passes_total{outcome}        counter    passes by outcome (every outcome from 0)
    reconciler_drifted_resources{corrected} gauge      drift found by the last pass
    reconciler_revision_info{applied,attempted,head,branch}  info  the revisions
    reconciler_suspended, reconciler_busy   gauge      0 or 1
    reconciler_passes_run                   gauge      passes since the daemon started
    reconciler_last_pass_timestamp_seconds  gauge      when the last pass started
    reconciler_resources{state}             gauge      resources by state (in-sync, drifted, ...)
    reconciler_gpu_memory_used_bytes{gpu,uuid}, reconciler_gpu_memory_total_bytes{gpu,uuid},
    reconciler_gpu_utilization_ratio{gpu,uuid} (0-1), reconciler_gpu_temperature_celsius{gpu,uuid},
    reconciler_gpu_power_watts{gpu,uuid}    gauge      per GPU, as NVML read it (absent when unknown)
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from reconciler.logs import fields
from reconciler.loop.events import GpuStatus, LoopControl, LoopStatus, Outcome, PassRecord

__all__ = ["CONTENT_TYPE", "LoopMetrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_GPU_LABELS = ["gpu", "uuid"]


class LoopMetrics:
    """The registry behind one server's `/metrics`."""

    def __init__(self, control: LoopControl) -> None:
        self.registry = CollectorRegistry()
        self._duration = Histogram(
            "reconciler_pass_duration_seconds", "How long a pass took", buckets=DURATION_BUCKETS, registry=self.registry
        )
        self._passes = Counter("reconciler_passes", "Passes by outcome", ["outcome"], registry=self.registry)
        for outcome in Outcome:
            self._passes.labels(outcome=outcome.value)
        self.registry.register(_StatusCollector(control))

    def observe(self, record: PassRecord) -> None:
        """A `PassListener`: count a finished pass."""
        self._duration.observe(max(record.duration, 0.0))
        self._passes.labels(outcome=record.outcome.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector(Collector):
    """Reads the loop's status snapshot at scrape time."""

    def __init__(self, control: LoopControl) -> None:
        self._control = control

    def collect(self) -> Iterator[Metric]:
        try:
            status = self._control.status()
        except Exception as exc:  # noqa: BLE001 - a scrape must still serve the pass counters
            log.warning("status unavailable for metrics", extra=fields(error=type(exc).__name__))
            return
        yield from _loop_metrics(status)
        yield from _gpu_metrics(status.gpus)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _loop_metrics(status: LoopStatus) -> Iterator[Metric]:
    info = InfoMetricFamily("reconciler_revision", "The applied, attempted and head revisions")
    info.add_metric(
        [],
        {
            "applied": status.applied_revision or "",
            "attempted": status.attempted_revision or "",
            "head": status.head_revision or "",
            "branch": status.source.branch,
        },
    )
    yield info
    yield _gauge("reconciler_suspended", "1 while the loop is suspended", float(status.suspended))
    yield _gauge("reconciler_busy", "1 while a pass runs", float(status.busy))
    yield _gauge("reconciler_passes_run", "Passes since the daemon started", float(status.passes))
    drift = status.last_pass.drift if status.last_pass else ()
    drifted = GaugeMetricFamily(
        "reconciler_drifted_resources", "Resources the last pass found drifted", labels=["corrected"]
    )
    corrected = sum(1 for report in drift if report.corrected)
    drifted.add_metric(["true"], float(corrected))
    drifted.add_metric(["false"], float(len(drift) - corrected))
    yield drifted
    if status.last_pass is not None:
        yield _gauge(
            "reconciler_last_pass_timestamp_seconds", "When the last pass started", float(status.last_pass.started)
        )
    states = GaugeMetricFamily("reconciler_resources", "Resources by state", labels=["state"])
    for state, count in sorted(Tally(resource.state for resource in status.resources).items()):
        states.add_metric([state], float(count))
    yield states


def _gpu_metrics(gpus: tuple[GpuStatus, ...]) -> Iterator[Metric]:
    families = {
        "memory_used": GaugeMetricFamily("reconciler_gpu_memory_used_bytes", "GPU memory in use", labels=_GPU_LABELS),
        "memory_total": GaugeMetricFamily("reconciler_gpu_memory_total_bytes", "GPU memory", labels=_GPU_LABELS),
        "utilization": GaugeMetricFamily(
            "reconciler_gpu_utilization_ratio", "GPU utilization (0-1)", labels=_GPU_LABELS
        ),
        "temperature": GaugeMetricFamily("reconciler_gpu_temperature_celsius", "GPU temperature", labels=_GPU_LABELS),
        "power": GaugeMetricFamily("reconciler_gpu_power_watts", "GPU power draw", labels=_GPU_LABELS),
    }
    for gpu in gpus:
        labels = [gpu.name, gpu.uuid or ""]
        readings = {
            "memory_used": gpu.memory_used,
            "memory_total": gpu.memory_total,
            "utilization": None if gpu.utilization is None else gpu.utilization / 100.0,
            "temperature": gpu.temperature,
            "power": gpu.power,
        }
        for key, value in readings.items():
            if value is not None:
                families[key].add_metric(labels, float(value))
    yield from families.values()
