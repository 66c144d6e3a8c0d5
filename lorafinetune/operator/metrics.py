"""The operator's own Prometheus metrics (reconciles, errors, durations, resources by phase, attempts)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from lorafinetune.api.status import PHASES


class OperatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "lorafinetune_operator_reconciles",
            "Reconciles run, by what queued them (change, job-event, pod-event, pvc-event, failed-create-event, "
            "progress, clock, retry, requeue)",
            ["handler"], registry=r,
        )
        self.errors = Counter(
            "lorafinetune_operator_reconcile_errors", "Reconciles that raised, by what queued them", ["handler"],
            registry=r,
        )
        self.duration = Histogram(
            "lorafinetune_operator_reconcile_duration_seconds", "Wall time of one reconcile", ["handler"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r,
        )  # fmt: skip
        self.resources = Gauge(
            "lorafinetune_operator_resources", "LoRAFineTunes known to this operator, by phase", ["phase"], registry=r
        )
        self.attempts = Counter("lorafinetune_operator_attempts_started", "Attempts (Jobs) created", registry=r)
        # What the reconciles cost the API server (kopf's own events, if any, are not counted).
        self.api_requests = Counter(
            "lorafinetune_operator_api_requests", "Kubernetes API requests made by reconciles, by verb and resource",
            ["verb", "resource"], registry=r,
        )  # fmt: skip
        # How long the API server takes to answer the reconciles (client-go's rest_client_request_duration_seconds):
        # in a burst, whether a fine-tune waits on the API server or on the operator. Watches are not timed.
        self.api_request_duration = Histogram(
            "lorafinetune_operator_api_request_duration_seconds",
            "Time from sending a reconcile's Kubernetes API request to its answer, by verb and resource",
            ["verb", "resource"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )  # fmt: skip
        # The operator's own share of apply -> Job: from the first watch event of a fine-tune to its first Job
        # created (the rest, the API server's watch delivery, it does not see).
        self.first_job = Histogram(
            "lorafinetune_operator_first_job_seconds",
            "Time from the operator first seeing a new fine-tune to its first Job created",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r,
        )  # fmt: skip
        # A new attempt's status waits while a burst of new fine-tunes waits for Jobs (operator/handlers.py):
        # how many wait now, and how long each attempt went unrecorded in its fine-tune's status.
        self.statuses_held = Gauge(
            "lorafinetune_operator_statuses_held",
            "New attempts whose status waits (a bounded time) for other new fine-tunes to get their Jobs",
            registry=r,
        )  # fmt: skip
        self.attempt_recorded = Histogram(
            "lorafinetune_operator_attempt_recorded_seconds",
            "Time from an attempt's Job created to the attempt written in its fine-tune's status",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15), registry=r,
        )  # fmt: skip
        self.events_dropped = Counter(
            "lorafinetune_operator_events_dropped", "Events not posted because the buffer was full", registry=r
        )
        self.events_pending = Gauge(
            "lorafinetune_operator_events_pending", "Events waiting to be posted (paced: LFT_EVENTS_PER_SECOND)",
            registry=r,
        )
        self.queue_depth = Gauge(
            "lorafinetune_operator_queue_depth", "Fine-tunes waiting for a worker in the work queue", registry=r
        )
        self.queue_wait = Histogram(
            "lorafinetune_operator_queue_wait_seconds",
            "Time from queued to taken by a worker, by lane (new: fine-tunes waiting for their first Job)",
            ["lane"], buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip
        # One series per fine-tune (like kube-state-metrics' *_info): bounded by the resources that exist.
        self.phase_info = Gauge(
            "lorafinetune_operator_finetune_phase", "1 for the current phase of each fine-tune",
            ["namespace", "finetune", "phase"], registry=r,
        )  # fmt: skip
        self._wait_by_lane = {lane: self.queue_wait.labels(lane=lane) for lane in ("new", "other")}
        self._phases: dict[str, str] = {}
        for phase in PHASES:
            self.resources.labels(phase=phase).set(0)

    def serve(self, port: int, queue_depth: Callable[[], int] | None = None,
              events_pending: Callable[[], int] | None = None,
              statuses_held: Callable[[], int] | None = None) -> None:  # fmt: skip
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        if statuses_held is not None:
            self.statuses_held.set_function(statuses_held)
        if events_pending is not None:
            self.events_pending.set_function(events_pending)
        if port:
            start_http_server(port, registry=self.registry)

    @contextlib.contextmanager
    def observe(self, handler: str) -> Iterator[None]:
        self.reconciles.labels(handler=handler).inc()
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.errors.labels(handler=handler).inc()
            raise
        finally:
            self.duration.labels(handler=handler).observe(time.perf_counter() - started)

    def waited(self, seconds: float, lane: str) -> None:
        self._wait_by_lane[lane].observe(seconds)

    def set_phase(self, key: str, phase: str | None) -> None:
        namespace, _, name = key.partition("/")
        old = self._phases.pop(key, None)
        if old == phase:  # the common case: a reconcile that changed nothing
            if phase is not None:
                self._phases[key] = phase
            return
        if old is not None:
            self.phase_info.remove(namespace, name, old)
            self.resources.labels(phase=old).dec()
        if phase is not None:
            self._phases[key] = phase
            self.phase_info.labels(namespace=namespace, finetune=name, phase=phase).set(1)
            self.resources.labels(phase=phase).inc()


OPERATOR_METRICS = OperatorMetrics()
