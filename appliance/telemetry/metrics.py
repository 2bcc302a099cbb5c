"""Prometheus metrics of one project process; names follow RELIABILITY.md 15 (one prefix, base units)."""

from __future__ import annotations

import platform
from typing import Any

import openvino
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import appliance

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """One registry per server, so several servers in one test process never share series."""

    def __init__(self, project: str, flow_sha256: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._serving: set[tuple[str, str, str]] = set()  # (model, version, device) of the loaded versions
        r = self.registry
        # api: the dialect that served the route (pekat, deepomatic, ..., core for health and metrics).
        self.requests = Counter("appliance_requests", "HTTP requests by route, status code and API",
                                ["endpoint", "code", "api"], registry=r)
        self.request_duration = Histogram("appliance_request_duration_seconds", "End-to-end request latency",
                                          ["endpoint", "api"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("appliance_stage_duration_seconds", "Time per stage of an analyze "
                                        "request: receive (body read), decode (or demosaic, or shared-memory "
                                        "copy), flow (all nodes), encode (the answer)", ["stage"],
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.stages = {stage: self.stage_duration.labels(stage) for stage in ("receive", "decode", "flow", "encode")}
        self.node_duration = Histogram("appliance_node_duration_seconds", "Time per flow node",
                                       ["node", "type"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram("appliance_inference_duration_seconds", "One model inference",
                                            ["model", "version", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("appliance_in_flight_requests", "Analyze requests being processed", registry=r)
        self.queue_depth = Gauge("appliance_queue_depth", "Analyze requests waiting for a worker", registry=r)
        self.rejected = Counter("appliance_rejected_requests", "Requests refused before processing", ["reason"],
                                registry=r)
        self.verdicts = Counter("appliance_verdicts", "Inspection verdicts", ["result"], registry=r)
        self.hook_errors = Counter("appliance_hook_errors", "Code hook failures", ["node"], registry=r)
        self.stuck_hooks = Gauge("appliance_stuck_hook_threads", "Code hook threads that never returned (7.3)",
                                 registry=r)
        self.auth_failures = Counter("appliance_auth_failures", "Requests with a missing or wrong API key",
                                     registry=r)
        self.client_disconnects = Counter("appliance_client_disconnects", "Clients gone before the answer",
                                          ["phase"], registry=r)
        self.model_load_failures = Counter("appliance_model_load_failures", "Model versions that failed to load",
                                           ["model"], registry=r)
        self.model_loads = Counter("appliance_model_loads", "Model versions compiled and warmed up",
                                   ["model"], registry=r)
        self.model_swaps = Counter("appliance_model_swaps", "Switches of a running model to another version",
                                   ["model"], registry=r)
        self.model_info = Gauge("appliance_model_info", "Loaded model versions and where they run",
                                ["model", "version", "device", "precision"], registry=r)
        Info("appliance_build", "Versions of this build", registry=r).info({
            "version": appliance.__version__,
            "openvino_version": openvino.__version__.split("-")[0],
            "python_version": platform.python_version(),
        })
        Info("appliance_project", "The project this process serves", registry=r).info({
            "project": project, "flow_sha256": flow_sha256})

    def node(self, node_id: str, node_type: str, seconds: float) -> None:
        self.node_duration.labels(node_id, node_type).observe(seconds)

    # The runtime's observer (appliance.runtime.models.RuntimeObserver).
    def inference(self, model: Any, seconds: float) -> None:
        # Only versions that describe_models listed: a request still finishing on a replaced version must not
        # bring back the series that the swap removed (one series per loaded version, never a growing set).
        if (model.name, model.version, model.device) in self._serving:
            self.inference_duration.labels(model.name, model.version, model.device).observe(seconds)

    def model_loaded(self, name: str, swapped: bool) -> None:
        self.model_loads.labels(name).inc()
        # Series at 0 from the first load, so increase() and changes() see the first swap or failure too.
        swaps = self.model_swaps.labels(name)
        self.model_load_failures.labels(name)
        if swapped:
            swaps.inc()

    def model_load_failed(self, name: str) -> None:
        self.model_load_failures.labels(name).inc()

    def describe_models(self, runtime: Any) -> None:
        """One appliance_model_info series per loaded model; the series of a replaced version goes away."""
        self.model_info.clear()
        serving = set()
        for slot in runtime.slots.values():
            if slot.current is not None:
                loaded = slot.current
                self.model_info.labels(loaded.name, loaded.version, ",".join(loaded.execution_devices),
                                       loaded.precision).set(1)
                serving.add((loaded.name, loaded.version, loaded.device))
        for replaced in self._serving - serving:
            self.inference_duration.remove(*replaced)
        self._serving = serving
