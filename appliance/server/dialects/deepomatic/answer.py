"""One Deepomatic output (`{"labels": {"predicted": [...], "discarded": [...]}}`) from a neutral Inspection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.flow.runner import FlowRunner
from appliance.server.inspection import Inspection


@dataclass(frozen=True)
class Geometry:
    """The input image's size and where the frame inspected (a `bbox` crop of it) starts in it."""

    width: int
    height: int
    left: int = 0
    top: int = 0


def box_threshold(runner: FlowRunner | None, node_id: str) -> float:
    """The score a box of ``node_id`` needed: the node's confidence, else its model's threshold, else 0.5."""
    node = runner.graph.nodes.get(node_id) if runner is not None else None
    settings = getattr(node, "settings", None)
    for value in (getattr(settings, "confidence", None), _spec_threshold(node),
                  getattr(settings, "min_confidence", None)):
        if value is not None:
            return float(value)
    return 0.5


def _spec_threshold(node: Any) -> float | None:
    slot = getattr(node, "slot", None)
    loaded = getattr(slot, "current", None)
    return getattr(getattr(loaded, "spec", None), "threshold", None)


def _unit(value: float) -> float:
    return min(1.0, max(0.0, value))


def render_output(inspection: Inspection, *, roi: str, labels: dict[str, tuple[int, str]] | None,
                  show_discarded: bool, max_predictions: int, geometry: Geometry,
                  runner: FlowRunner | None) -> dict[str, Any]:
    """Predicted labels best first, then (with show_discarded) the best discarded ones: `max_predictions` covers
    both lists together. ``labels``: a private spec's labels by lower-case name; labels of the model that the spec
    does not name are left out."""
    predicted: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    if roi == "BBOX":
        identities = {(f.x, f.y, f.width, f.height): f.identity for f in inspection.faces if f.identity}
        thresholds: dict[str, float] = {}
        for box in sorted(inspection.rectangles, key=lambda b: -b.score):
            if box.node not in thresholds:
                thresholds[box.node] = box_threshold(runner, box.node)
            width, height = max(1, geometry.width), max(1, geometry.height)
            left, top = geometry.left + box.x, geometry.top + box.y
            bbox = {"xmin": _unit(left / width), "ymin": _unit(top / height),
                    "xmax": _unit((left + box.width) / width), "ymax": _unit((top + box.height) / height)}
            name = identities.get((box.x, box.y, box.width, box.height)) or box.label
            entry: dict[str, Any] = {"label_id": box.label_id, "label_name": name, "score": box.score,
                     "threshold": thresholds[box.node], "roi": {"region_id": 0, "bbox": bbox}}
            (predicted if box.score >= thresholds[box.node] else discarded).append(entry)
    else:
        for label in inspection.labels:
            entry = {"label_id": label.id, "label_name": label.name, "score": label.score,
                     "threshold": label.threshold}
            (predicted if label.predicted else discarded).append(entry)
        predicted.sort(key=lambda e: -e["score"])
        discarded.sort(key=lambda e: -e["score"])
    if labels is not None:
        predicted, discarded = _as_spec(predicted, labels), _as_spec(discarded, labels)
    predicted = predicted[:max_predictions]
    discarded = discarded[:max_predictions - len(predicted)] if show_discarded else []
    if roi == "BBOX":
        for region_id, entry in enumerate([*predicted, *discarded], start=1):
            entry["roi"] = {**entry["roi"], "region_id": region_id}
    return {"labels": {"predicted": predicted, "discarded": discarded}}


def _as_spec(entries: list[dict[str, Any]], labels: dict[str, tuple[int, str]]) -> list[dict[str, Any]]:
    renamed = []
    for entry in entries:
        found = labels.get(entry["label_name"].strip().lower())
        if found is not None:
            renamed.append({**entry, "label_id": found[0], "label_name": found[1]})
    return renamed
