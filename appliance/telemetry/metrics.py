"""Prometheus metrics of one project process; names follow RELIABILITY.md 15 (one prefix, base units)."""

from __future__ import annotations

import math
import platform
import threading
from collections.abc import Callable
from typing import Any, TypeGuard

import openvino
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

import appliance

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Anomaly score over the node's threshold: 1 is the threshold (at or over it the node marks the frame), finest
# around it, where a drifting camera or a dirty lens moves good parts first.
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0)
# Probabilities (classifier top score, detector, face and OCR confidences): finest near 1, where confident
# answers live and where a slow loss of confidence shows first.
PROBABILITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
# Node types whose rectangles carry a model's confidence (a Code hook's rectangles carry whatever it says).
CONFIDENCE_NODES = frozenset({"detect@1", "faces@1", "ocr@1"})


def thread_count() -> int:
    """Threads of this process, OpenVINO's and the hooks' included (what systemd's TasksMax counts)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return threading.active_count()  # no /proc: the Python threads only


class Metrics:
    """One registry per server, so several servers in one test process never share series."""

    def __init__(self, project: str, flow_sha256: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._serving: set[tuple[str, str, str]] = set()  # (model, version, device) of the loaded versions
        # The series of every request and node observation, looked up once: prometheus_client's labels() costs
        # 2.3 us a call, more than the inc() it is for (measured here); routes, statuses, APIs and nodes are
        # bounded sets, and none of these series is ever removed.
        # (metric, label values) -> its child: labels() costs more than inc() or observe(), and the series below
        # are touched per request, node, rectangle or output message.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
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
        # Both read the server's own counts at each scrape (follow_queue): nothing to update per request.
        self.in_flight = Gauge("appliance_in_flight_requests", "Analyze requests being processed", registry=r)
        self.queue_depth = Gauge("appliance_queue_depth", "Analyze requests waiting for a worker", registry=r)
        self.rejected = Counter("appliance_rejected_requests", "Requests refused before processing", ["reason"],
                                registry=r)
        # outcome: sent, dropped (queue full), failed (a try that failed; the message is tried again).
        self.output_messages = Counter("appliance_output_messages", "Messages of each output by outcome",
                                       ["output", "outcome"], registry=r)
        self.output_queued = Gauge("appliance_output_queue_depth", "Messages waiting in each output's queue",
                                   ["output"], registry=r)
        # outcome: acquired, inspected, dropped (busy), failed (the source failed and is opened again).
        self.source_frames = Counter("appliance_source_frames", "Frames of each source by outcome",
                                     ["source", "outcome"], registry=r)
        self.verdicts = Counter("appliance_verdicts", "Inspection verdicts", ["result"], registry=r)
        self._verdict_series = {True: self.verdicts.labels("ok"), False: self.verdicts.labels("ng")}
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
        self.ready = Gauge("appliance_ready", "1 when GET /health/ready answers 200: every node prepared, not "
                           "draining, fewer stuck Code hooks than limits.max_stuck_hooks", registry=r)
        # Scores per node, labelled by the node ids of the project's flows (a bounded set).
        self.anomaly_ratio = Histogram("appliance_anomaly_score_threshold_ratio", "Anomaly score of a frame over "
                                       "the threshold it was judged by (1: at the threshold)", ["node"],
                                       buckets=RATIO_BUCKETS, registry=r)
        self.classifier_top = Histogram("appliance_classifier_top_score", "Highest label score of a classify "
                                        "node per frame (0 when no label reached the node's lowest threshold and "
                                        "show_discarded is off)", ["node"], buckets=PROBABILITY_BUCKETS,
                                        registry=r)
        self.detection_confidence = Histogram("appliance_detection_confidence", "Confidence of each rectangle a "
                                              "detect, faces or ocr node kept", ["node"],
                                              buckets=PROBABILITY_BUCKETS, registry=r)
        # Remote model servers (firmware profile `remote:`, runtime/remote.py), each labelled by its URL's host
        # and port only. kind: connect, timeout, disconnected, busy (no free connection), http_4xx, http_5xx,
        # http_503, answer (not the protocol's), metadata, circuit_open (refused at once by the open breaker).
        self.remote_requests = Counter("appliance_remote_requests", "Inference calls a remote model server "
                                       "answered", ["remote"], registry=r)
        self.remote_failures = Counter("appliance_remote_failures", "Inference calls to a remote model server "
                                       "that failed, by kind", ["remote", "kind"], registry=r)
        self.remote_retries = Counter("appliance_remote_retries", "Requests to a remote model server sent again "
                                      "(connection failed, or 503)", ["remote"], registry=r)
        self.remote_duration = Histogram("appliance_remote_request_duration_seconds", "One answered inference call "
                                         "to a remote model server, retries included", ["remote"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.remote_circuit = Gauge("appliance_remote_circuit_state", "Circuit breaker of each remote model server: "
                                    "0 closed, 1 half-open (the next call tries), 2 open (calls fail at once)",
                                    ["remote"], registry=r)
        # The process: memory, CPU seconds, descriptors (from /proc), and threads.
        ProcessCollector(registry=r)
        Gauge("process_threads", "Threads of this process (all of them, as TasksMax counts)",
              registry=r).set_function(thread_count)
        Info("appliance_build", "Versions of this build", registry=r).info({
            "version": appliance.__version__,
            "openvino_version": openvino.__version__.split("-")[0],
            "python_version": platform.python_version(),
        })
        self.project_info = Info("appliance_project", "The project this process serves", registry=r)
        self.describe_project(project, flow_sha256)

    def describe_project(self, project: str, flow_sha256: str) -> None:
        """At start and after each reload: the flow's hash tells which flow a dashboard's numbers came from."""
        self.project_info.info({"project": project, "flow_sha256": flow_sha256})

    def _series(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def source_frame(self, source: str, outcome: str) -> None:
        self._series(self.source_frames, source, outcome).inc()

    def output_message(self, output: str, outcome: str) -> None:
        self._series(self.output_messages, output, outcome).inc()

    def output_queue(self, output: str, waiting: int) -> None:
        self._series(self.output_queued, output).set(waiting)

    def request(self, endpoint: str, status: int, api: str, seconds: float) -> None:
        self._series(self.requests, endpoint, str(status), api).inc()
        self._series(self.request_duration, endpoint, api).observe(seconds)

    def node(self, node_id: str, node_type: str, seconds: float) -> None:
        self._series(self.node_duration, node_id, node_type).observe(seconds)

    def verdict(self, ok: bool) -> None:
        self._verdict_series[ok].inc()

    def follow_queue(self, waiting: Callable[[], int], in_flight: Callable[[], int]) -> None:
        """appliance_queue_depth and appliance_in_flight_requests read the server's counts at each scrape: a
        gauge's inc() and dec() take a lock each, four per request, for numbers the server keeps anyway."""
        self.queue_depth.set_function(waiting)
        self.in_flight.set_function(in_flight)

    def follow_readiness(self, is_ready: Callable[[], bool]) -> None:
        """appliance_ready reads ``is_ready`` at each scrape."""
        self.ready.set_function(lambda: 1.0 if is_ready() else 0.0)

    def observe_scores(self, ctx: dict[str, Any], project: Any, capability: str | None = None) -> None:
        """The scores an inspected frame carries, per node: anomaly score over threshold, classifier top score,
        rectangle confidences. Only ids of nodes of the flow that ran (the project's, or ``capability``'s) label
        a series, by their type: a Code hook that writes odd ids or values adds no series and raises nothing."""
        runner = project.runner if capability is None else project.capabilities.get(capability)
        nodes = runner.graph.nodes if runner is not None else {}

        def node_types(node_id: str) -> str | None:
            node = nodes.get(node_id)
            return node.settings.type if node is not None else None

        score, threshold = ctx.get("score"), ctx.get("threshold")
        if _number(score) and _number(threshold) and threshold > 0:
            # ctx["score"] is the last anomaly node's: the last anomaly node in the models it names.
            for used in reversed(_dicts(ctx.get("models"))):
                node = used.get("node")
                if isinstance(node, str) and node_types(node) == "anomaly@1":
                    self._series(self.anomaly_ratio, node).observe(score / threshold)
                    break
        for result in _dicts(ctx.get("classification")):
            node = result.get("node")
            # The node always writes a list of predictions (maybe empty); anything else is no node's answer.
            if isinstance(node, str) and isinstance(result.get("predicted"), list) and node_types(node) == "classify@1":
                scores = [entry.get("score") for key in ("predicted", "discarded")
                          for entry in _dicts(result.get(key))]
                self._series(self.classifier_top, node).observe(max([s for s in scores if _number(s)], default=0.0))
        for rectangle in _dicts(ctx.get("detectedRectangles")):
            source, confidence = rectangle.get("source"), rectangle.get("confidence")
            node = source.get("moduleId") if isinstance(source, dict) else None
            if isinstance(node, str) and _number(confidence) and node_types(node) in CONFIDENCE_NODES:
                self._series(self.detection_confidence, node).observe(confidence)

    # The runtime's observer (appliance.runtime.models.RuntimeObserver).
    def inference(self, model: Any, seconds: float) -> None:
        # Only versions that describe_models listed: a request still finishing on a replaced version must not
        # bring back the series that the swap removed (one series per loaded version, never a growing set).
        if (model.name, model.version, model.device) in self._serving:
            self.inference_duration.labels(model.name, model.version, model.device).observe(seconds)

    # The remote backend's observer (appliance.runtime.remote.RemoteObserver).
    def follow_remote(self, remote: str, circuit_state: Callable[[], float]) -> None:
        """The breaker's gauge reads its state at each scrape (it turns half-open by time, with no call); the
        counters start at 0 so that increase() sees the first failure."""
        self.remote_circuit.labels(remote).set_function(circuit_state)
        self.remote_requests.labels(remote)
        self.remote_retries.labels(remote)

    def remote_call(self, remote: str, seconds: float) -> None:
        self.remote_requests.labels(remote).inc()
        self.remote_duration.labels(remote).observe(seconds)

    def remote_failure(self, remote: str, kind: str) -> None:
        self.remote_failures.labels(remote, kind).inc()

    def remote_retry(self, remote: str) -> None:
        self.remote_retries.labels(remote).inc()

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


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
