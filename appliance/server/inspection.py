"""The neutral result of one inspection, what the serving core hands every dialect.

The flow works on PEKAT's context dict (Code hooks see it unchanged); this class reads that context once the
flow is done and gives every API the same vendor-free view: the verdict, rectangles in input-frame pixels with
labels and scores, classification labels, text lines, faces, errors and per-node times, and the answer images.
A dialect renders from it; the PEKAT dialect renders the context itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from appliance.context import Context


@dataclass(frozen=True)
class Box:
    """A rectangle in input-frame pixels."""

    x: int
    y: int
    width: int
    height: int
    label: str
    label_id: int
    score: float  # 0..1
    node: str
    kind: str  # the rectangle's source: DETECTION, UNSUPERVISED, OCR, SEGMENTATION, or what a hook set


@dataclass(frozen=True)
class Label:
    """One label of a classification: predicted when its score reached its threshold."""

    id: int
    name: str
    score: float
    threshold: float
    predicted: bool
    node: str


@dataclass(frozen=True)
class TextLine:
    text: str
    score: float
    corners: list[tuple[float, float]]  # input-frame pixels, clockwise from the top-left
    node: str


@dataclass(frozen=True)
class Face:
    """A face in input-frame pixels, with what the nodes after the face detector found about it."""

    x: int
    y: int
    width: int
    height: int
    score: float
    node: str
    age: float | None = None
    age_confidence: float | None = None
    gender: str | None = None
    gender_score: float | None = None
    identity: str | None = None
    distance: float | None = None


ImageKind = Literal["image", "annotated_image", "heatmap"]


def _number(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class Inspection:
    """What one frame came to. Parts are read from the context on first use: a dialect pays for what it shows."""

    def __init__(self, context: Context, capability: str | None = None):
        self.context = context
        self.capability = capability

    @property
    def verdict(self) -> bool:
        return bool(self.context.get("result"))

    @property
    def score(self) -> float | None:
        value = self.context.get("score")
        return None if value is None else _number(value)

    @property
    def threshold(self) -> float | None:
        value = self.context.get("threshold")
        return None if value is None else _number(value)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the input frame."""
        shape = self.context.get("imageShape") or {}
        return int(shape.get("width", 0)), int(shape.get("height", 0))

    @cached_property
    def rectangles(self) -> list[Box]:
        boxes = []
        for rectangle in self.context.get("detectedRectangles") or []:
            if not isinstance(rectangle, dict):
                continue
            names = rectangle.get("classNames") or [{}]
            first = names[0] if isinstance(names[0], dict) else {}
            source = rectangle.get("source")
            source = source if isinstance(source, dict) else {}
            try:
                boxes.append(Box(int(rectangle["x"]), int(rectangle["y"]), int(rectangle["width"]),
                                 int(rectangle["height"]), str(first.get("label", "")), int(first.get("id", 0)),
                                 _number(rectangle.get("confidence"), _number(first.get("confidence")) / 100),
                                 str(source.get("moduleId", "")), str(source.get("type", ""))))
            except (KeyError, TypeError, ValueError):
                continue  # a hook's malformed rectangle: PEKAT shows it as it is, other APIs skip it
        return boxes

    @cached_property
    def labels(self) -> list[Label]:
        """Every classification node's labels, predicted first, each list best first."""
        found = []
        for result in self.context.get("classification") or []:
            for key, predicted in (("predicted", True), ("discarded", False)):
                for entry in result.get(key) or []:
                    found.append(Label(int(entry["label_id"]), str(entry["label_name"]), _number(entry["score"]),
                                       _number(entry["threshold"]), predicted, str(result.get("node", ""))))
        return found

    @cached_property
    def text(self) -> list[TextLine]:
        return [TextLine(str(entry.get("text", "")), _number(entry.get("confidence")),
                         [(float(x), float(y)) for x, y in entry.get("box") or []], str(entry.get("node", "")))
                for entry in self.context.get("ocr") or [] if isinstance(entry, dict)]

    @cached_property
    def faces(self) -> list[Face]:
        faces = []
        for entry in self.context.get("faces") or []:
            if not isinstance(entry, dict) or len(entry.get("box") or ()) != 4:
                continue
            x, y, width, height = (int(v) for v in entry["box"])
            optional = {key: entry.get(key) for key in ("age", "age_confidence", "gender", "gender_score",
                                                         "identity", "distance")}
            faces.append(Face(x, y, width, height, _number(entry.get("score")), str(entry.get("node", "")),
                              **optional))
        return faces

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.context.get("errors") or [] if isinstance(e, dict)]

    @property
    def timings(self) -> list[tuple[str, float]]:
        """(node id, seconds) for every node run, in order."""
        return list(self.context.get("timings") or [])

    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self.context.get("models") or [])

    @property
    def processing_seconds(self) -> float:
        return _number(self.context.get("processingTime"))

    def image(self, kind: ImageKind = "image") -> np.ndarray:
        """The flow's final image, the annotated one (verdict, rectangles, heat map), or the heat map alone."""
        from appliance.server import render

        if kind == "annotated_image":
            return render.annotated(self.context)
        if kind == "heatmap":
            return render.heatmap(self.context)
        return self.context["image"]
