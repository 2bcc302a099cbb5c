"""The line's numbers for the live view, read from the metrics /metrics serves (one source of truth): OK/NG
counts and rates over the last minute, the last hour and since start, analyze latency p50/p99, queue depth, in
flight, and refusals by reason.

A sample of the counters is taken every SAMPLE_S seconds on the event loop; a window's figures are the
difference between the newest sample and the one at the window's start (as Prometheus' increase() does), and
percentiles are interpolated inside the histogram's buckets (as histogram_quantile() does).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from appliance.telemetry.metrics import LATENCY_BUCKETS, Metrics

SAMPLE_S = 2.0
HOUR_S = 3600.0
# Routes that inspect nothing: their times are not the line's latency.
_NOT_INSPECTIONS = frozenset({"/ping", "/version", "/stop", "/last_image", "unmatched"})
_NOT_INSPECTION_APIS = frozenset({"core", "console"})


@dataclass
class Sample:
    at: float  # monotonic seconds
    ok: float
    ng: float
    buckets: dict[float, float]  # upper bound -> cumulative count of analyze requests
    rejected: dict[str, float] = field(default_factory=dict)


def _samples(metric: Any) -> list[Any]:
    return [sample for family in metric.collect() for sample in family.samples]


def take_sample(metrics: Metrics) -> Sample:
    verdicts = {s.labels.get("result"): s.value for s in _samples(metrics.verdicts) if s.name.endswith("_total")}
    buckets: dict[float, float] = {}
    for s in _samples(metrics.request_duration):
        if (s.name.endswith("_bucket") and s.labels.get("api") not in _NOT_INSPECTION_APIS
                and s.labels.get("endpoint") not in _NOT_INSPECTIONS):
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + s.value
    rejected: dict[str, float] = {}
    for s in _samples(metrics.rejected):
        if s.name.endswith("_total"):
            reason = s.labels.get("reason", "")
            rejected[reason] = rejected.get(reason, 0.0) + s.value
    return Sample(time.monotonic(), verdicts.get("ok", 0.0), verdicts.get("ng", 0.0), buckets, rejected)


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """The q-quantile in seconds of the requests counted between two cumulative bucket snapshots; None without
    requests; +inf when it lies beyond the largest finite bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return math.inf
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return None


class LineStats:
    """Samples of the counters over the last hour, and the figures the page shows."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.started = time.monotonic()
        self.start_sample = Sample(self.started, 0.0, 0.0, {}, {})
        self.samples: deque[Sample] = deque(maxlen=int(HOUR_S / SAMPLE_S) + 2)

    def sample(self) -> Sample:
        latest = take_sample(self.metrics)
        self.samples.append(latest)
        return latest

    def _at(self, seconds_ago: float, now: float) -> Sample:
        """The oldest sample no older than the window (the process start when it is younger than the window)."""
        for sample in self.samples:
            if now - sample.at <= seconds_ago + SAMPLE_S / 2:
                return sample
        return self.start_sample

    def _window(self, latest: Sample, first: Sample) -> dict[str, Any]:
        seconds = max(latest.at - first.at, 1e-9)
        ok, ng = latest.ok - first.ok, latest.ng - first.ng
        total = ok + ng
        p50, p99 = quantile(0.5, first.buckets, latest.buckets), quantile(0.99, first.buckets, latest.buckets)
        refused = {reason: value - first.rejected.get(reason, 0.0) for reason, value in latest.rejected.items()}
        return {
            "seconds": round(seconds, 1), "ok": int(ok), "ng": int(ng),
            "per_minute": round(total * 60 / seconds, 1) if seconds >= 1 else None,
            "ng_percent": round(100 * ng / total, 2) if total else None,
            "p50_ms": _milliseconds(p50), "p99_ms": _milliseconds(p99),
            "refused": int(sum(refused.values())), "refused_by_reason": {k: int(v) for k, v in refused.items() if v},
        }

    def snapshot(self, queue_limit: int) -> dict[str, Any]:
        """The three windows, and the queue and in-flight gauges now; ``queue_limit``: the admission's depth."""
        latest = take_sample(self.metrics)
        now = latest.at
        return {
            "minute": self._window(latest, self._at(60, now)),
            "hour": self._window(latest, self._at(HOUR_S, now)),
            "start": self._window(latest, self.start_sample),
            "queued": int(_gauge(self.metrics.queue_depth)), "queue_limit": queue_limit,
            "in_flight": int(_gauge(self.metrics.in_flight)), "uptime_s": round(now - self.started, 1),
        }


def _gauge(metric: Any) -> float:
    return sum(sample.value for sample in _samples(metric))


def _milliseconds(seconds: float | None) -> float | str | None:
    if seconds is None:
        return None
    if math.isinf(seconds):
        return f"> {LATENCY_BUCKETS[-1] * 1000:g}"  # past the largest finite bucket
    return round(seconds * 1000, 2)
