"""Prometheus metrics, served as `GET /metrics` on the WebSocket port.

Counters and histograms are updated where things happen (a task ends, a job is done, a worker
is replaced); figures that status already knows (memory, queue depth, slot states) are read from
it at each scrape, so /metrics and `capsctl status` cannot disagree.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from capsd import __version__

# Seconds: a mic result in tens of milliseconds up to a long segment of a slow model.
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STATES = ("starting", "ready", "busy", "draining", "restarting", "failed")
RATE_WINDOW_S = 60.0
# The exposition is computed at most once per this many seconds; a scrape within it gets the same
# bytes, so a flood of scrapers costs little (docs/design.md#health-and-metrics).
EXPOSITION_INTERVAL_S = 1.0


class Metrics:
    def __init__(self, status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Counter("capsd_tasks", "Tasks ended, by source and outcome (done or the error code)",
                             ["source", "outcome"], registry=r)  # fmt: skip
        self.bad_frames = Counter("capsd_bad_frames", "Frames refused without a task id to answer", registry=r)
        self.audio = Counter("capsd_audio_seconds", "Audio of the tasks recognised, in seconds", registry=r)
        self.decode = Histogram("capsd_decode_seconds", "Time a worker spent on one segment", buckets=BUCKETS,
                                registry=r)  # fmt: skip
        self.queue_wait = Histogram("capsd_queue_wait_seconds", "Time a segment waited for a worker",
                                    buckets=BUCKETS, registry=r)  # fmt: skip
        self.latency = Histogram("capsd_result_latency_seconds",
                                 "From a task's final frame received to its final result sent", ["source"],
                                 buckets=BUCKETS, registry=r)  # fmt: skip
        self.restarts = Counter("capsd_worker_restarts", "Worker processes replaced, by slot and reason",
                                ["slot", "reason"], registry=r)  # fmt: skip
        self.retried_jobs = Counter("capsd_jobs_retried", "Jobs run once more after their worker died "
                                    "([workers] retry_lost_jobs)", registry=r)  # fmt: skip
        self.poison_jobs = Counter("capsd_poison_jobs", "Jobs that ended more workers than retry_lost_jobs allows: "
                                   "their tasks failed", registry=r)  # fmt: skip
        self.expositions = Counter("capsd_metrics_expositions", "Times the exposition was computed "
                                   f"(at most once per {EXPOSITION_INTERVAL_S:g} s)", registry=r)  # fmt: skip
        Info("capsd_build", "capsd's version", registry=r).info({"version": __version__})
        if status is not None:
            r.register(StatusCollector(status))
        self.started = time.monotonic()
        self.recent: deque[tuple[float, float]] = deque()  # (when, seconds) of the last minute's audio
        self.exposed, self.exposed_at = b"", -math.inf

    def recognised(self, seconds: float) -> None:
        """A task's audio, recognised."""
        now = time.monotonic()
        self.audio.inc(seconds)
        self.recent.append((now, seconds))
        while self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def audio_per_second(self) -> float:
        """Audio recognised per wall second over the last minute (or since the start)."""
        now = time.monotonic()
        window = min(RATE_WINDOW_S, now - self.started) or 1.0
        return sum(seconds for when, seconds in self.recent if when >= now - window) / window

    def exposition(self) -> bytes:
        now = time.monotonic()
        if now - self.exposed_at >= EXPOSITION_INTERVAL_S:
            self.expositions.inc()  # before: the exposition counts itself
            self.exposed, self.exposed_at = generate_latest(self.registry), now
        return self.exposed


class StatusCollector(Collector):
    """What status says, as gauges, read at each scrape."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.status()
        slots = status["slots"]

        def per_slot(name: str, doc: str, key: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["slot"])
            for s in slots:
                family.add_metric([str(s["slot"])], s[key])
            return family

        yield per_slot("capsd_worker_rss_bytes", "Resident memory of each slot's worker", "rss_bytes")
        yield per_slot("capsd_worker_private_bytes", "Memory each slot's worker holds alone (USS)", "private_bytes")
        yield per_slot("capsd_worker_shared_bytes", "Resident memory each slot's worker shares (RSS less USS): "
                       "with its loader and siblings, if forked", "shared_bytes")  # fmt: skip
        loaders = {"rss_bytes": "Resident memory of each model's loader", "private_bytes": "Memory each loader holds alone (USS)"}
        for key, doc in loaders.items():  # docs/design.md#workers-forked-from-a-loader
            family = GaugeMetricFamily(f"capsd_loader_{key}", doc, labels=["pid", "model"])
            for loader in status["loaders"]:
                family.add_metric([str(loader["pid"]), loader["model"]["dir"]], loader[key])
            yield family
        yield per_slot("capsd_queue_depth", "Jobs waiting in each slot's queue", "queue_depth")
        yield per_slot("capsd_tasks_in_progress", "Tasks in progress homed on each slot", "tasks_in_progress")
        yield per_slot("capsd_worker_busy_ratio", "Share of the last minute each worker spent on jobs", "busy_share")
        yield per_slot("capsd_worker_cpu_ratio", "Each worker's CPU seconds per second, last minute", "cpu_share")
        states = GaugeMetricFamily("capsd_slot_state", "Each slot's state (1 for the current one)",
                                   labels=["slot", "state"])  # fmt: skip
        for s in slots:
            for state in STATES:
                states.add_metric([str(s["slot"]), state], float(s["state"] == state))
        yield states
        yield GaugeMetricFamily("capsd_connections", "Open WebSocket connections", value=status["connections"])
        yield GaugeMetricFamily("capsd_memory_planned_bytes", "The memory plan's total",
                                value=status["memory"]["planned_bytes"])  # fmt: skip
        yield GaugeMetricFamily("capsd_memory_available_bytes", "Memory available to capsd when it planned",
                                value=status["memory"]["available_bytes"])  # fmt: skip
        intake = status["intake"]  # docs/design.md#intake
        yield GaugeMetricFamily("capsd_intake_held_bytes", "Client audio the supervisor holds: frames, buffered, queued",
                                value=intake["held_bytes"])  # fmt: skip
        yield GaugeMetricFamily("capsd_intake_budget_bytes", "What the intake admits, from the memory plan",
                                value=intake["budget_bytes"])  # fmt: skip
        yield GaugeMetricFamily("capsd_intake_waiting_connections", "Connections not read until the intake has room",
                                value=intake["connections_waiting"])  # fmt: skip
