"""The PEKAT context: the dict that travels through a flow, what hooks see, and how it becomes JSON.

Keys follow PROTOCOL.md section 2. Rectangles in `detectedRectangles` are always in pixels of the input
frame; `Context.to_frame` maps pixels of the current `image` (after crops, resizes, rotations) back to it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

# Keys that hold arrays or control flags and never go to the client (PROTOCOL.md 2).
# `request`: the query parameters the flow lets a request set (overrides, lang), read by the nodes.
# `timings`: (node id, seconds) per node run, for the APIs that report them.
PRIVATE_KEYS = frozenset({"image", "heatmaps", "exit", "items", "request", "timings"})


class Context(dict):
    """A plain dict for user code, plus the geometry that maps the current image back to the input frame."""

    to_frame: np.ndarray

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.to_frame = np.eye(3)

    @classmethod
    def for_frame(cls, image: np.ndarray, data: str, warnings: list[str] | None = None,
                  request: dict[str, Any] | None = None) -> Context:
        ctx = cls(
            result=None, processing=True, error=False, errors=[],
            imageShape={"height": int(image.shape[0]), "width": int(image.shape[1])},
            processingTime=0.0, completeTime=0.0, save=False, data=data, production_mode=True,
            operatorInput={}, globalData={}, stdout="", stderr="", surfaceClasses=[], angle=None, lines=[],
            detectedRectangles=[], image=image, heatmaps=[],
        )
        if warnings:
            ctx["warnings"] = list(warnings)
        if request:
            ctx["request"] = dict(request)
        return ctx

    def transform_image(self, image: np.ndarray, image_to_previous: np.ndarray) -> None:
        """Replace the image with a geometric transform of it; `image_to_previous` maps new pixels to old ones."""
        self["image"] = image
        self.to_frame = self.to_frame @ image_to_previous

    def frame_box(self, x: float, y: float, width: float, height: float) -> tuple[int, int, int, int]:
        """A box in current-image pixels -> the axis-aligned box that covers it in input-frame pixels.

        `to_frame` maps pixel centres (a mirror sends pixel x to width - 1 - x); a box's edges lie half a pixel
        outside its first and last pixels' centres, so they are moved to centre coordinates, mapped and moved
        back (mapping the edges as they are put a mirrored box one pixel off)."""
        left_, top_, right_, bottom_ = x - 0.5, y - 0.5, x + width - 0.5, y + height - 0.5
        corners = np.array([[left_, top_, 1], [right_, top_, 1], [left_, bottom_, 1], [right_, bottom_, 1]], float)
        mapped = corners @ self.to_frame.T
        mapped = mapped[:, :2] / mapped[:, 2:3] + 0.5
        # The tolerance keeps an exact edge (e.g. 200.0000000001 after a rotation's float matrix) where it is.
        left, top = np.floor(mapped.min(axis=0) + 1e-6)
        right, bottom = np.ceil(mapped.max(axis=0) - 1e-6)
        return int(left), int(top), int(right - left), int(bottom - top)

    def frame_points(self, points: np.ndarray) -> np.ndarray:
        """Points (N x 2, x and y) in current-image pixels -> input-frame pixels."""
        mapped = np.column_stack([np.asarray(points, float).reshape(-1, 2), np.ones(len(points))]) @ self.to_frame.T
        return mapped[:, :2] / mapped[:, 2:3]

    def image_points(self, points: np.ndarray) -> np.ndarray:
        """Points (N x 2) in input-frame pixels -> current-image pixels (the inverse of `frame_points`)."""
        mapped = (np.column_stack([np.asarray(points, float).reshape(-1, 2), np.ones(len(points))])
                  @ np.linalg.inv(self.to_frame).T)
        return mapped[:, :2] / mapped[:, 2:3]

    def add_error(self, node: str, message: str, error_type: str | None = None, **extra: Any) -> None:
        entry: dict[str, Any] = {"node": node}
        if error_type:
            entry["type"] = error_type
        entry["message"] = message
        entry.update(extra)
        self["errors"].append(entry)
        self["error"] = True

    def add_rectangle(self, node: str, x: float, y: float, width: float, height: float, *, label: str,
                      confidence: float, source_type: str, color: str | None = None, class_id: int = 1,
                      model_id: int = 0) -> dict[str, Any]:
        """Add a rectangle given in current-image pixels; it is stored in input-frame pixels (PROTOCOL.md 3)."""
        fx, fy, fw, fh = self.frame_box(x, y, width, height)
        class_name: dict[str, Any] = {"id": class_id, "label": label, "confidence": round(confidence * 100)}
        if color:
            class_name["color"] = color
        rectangle = {
            "x": fx, "y": fy, "width": fw, "height": fh, "rotate": 0.0, "confidence": float(confidence),
            "id": len(self["detectedRectangles"]) + 1, "detectedAsLast": True, "classNames": [class_name],
            "source": {"modelId": model_id, "moduleId": node, "type": source_type},
        }
        self["detectedRectangles"].append(rectangle)
        return rectangle


def finish(ctx: Context, started: float) -> None:
    """Fill the keys the client reads last: ids, detectedAsLast, the default verdict and the times."""
    rectangles = ctx.get("detectedRectangles")
    if isinstance(rectangles, list):
        last_module = None
        for index, rectangle in enumerate(rectangles, start=1):
            if isinstance(rectangle, dict):
                rectangle["id"] = index
                last_module = (rectangle.get("source") or {}).get("moduleId", last_module)
        for rectangle in rectangles:
            if isinstance(rectangle, dict):
                rectangle["detectedAsLast"] = (rectangle.get("source") or {}).get("moduleId") == last_module
    if ctx.get("result") is None:
        # The rule: a flow without an evaluation passes.
        ctx["result"] = True
    ctx["processingTime"] = time.perf_counter() - started


def _clean(value: Any, key: str, dropped: list[tuple[str, str]]) -> Any:
    """JSON-able copy of `value`; numpy scalars become numbers, NaN/Inf null, anything else is dropped."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.datetime64, np.timedelta64)):
        return _clean(value.item(), key, dropped)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                dropped.append((f"{key}.{k}", f"key of type {type(k).__name__} is not a string"))
                continue
            cleaned = _clean(v, f"{key}.{k}", dropped)
            if cleaned is not DROPPED:
                out[k] = cleaned
        return out
    if isinstance(value, (list, tuple)):
        items = [_clean(v, f"{key}[{i}]", dropped) for i, v in enumerate(value)]
        return [item for item in items if item is not DROPPED]
    dropped.append((key, f"value of type {type(value).__name__} is not JSON-serialisable; dropped"))
    return DROPPED


DROPPED = object()


def clean_json(value: Any, key: str) -> tuple[Any, list[tuple[str, str]]]:
    """(JSON-able copy of value or DROPPED, [(key path, why it was dropped)])."""
    dropped: list[tuple[str, str]] = []
    return _clean(value, key, dropped), dropped


_JSON_LEAVES = frozenset({str, int, bool, type(None)})


def _plain_json(value: Any) -> bool:
    """True when json.dumps writes ``value`` exactly as `_clean` would keep it: only dicts with str keys, lists,
    tuples, str, int, bool, None and finite floats, of exactly those types (no subclass, no numpy scalar)."""
    kind = type(value)
    if kind in _JSON_LEAVES:
        return True
    if kind is float:
        return math.isfinite(value)
    # Loops, not all() over a generator: half the time of this check.
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _plain_json(item):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:
            if not _plain_json(item):
                return False
        return True
    return False


def to_json(ctx: Context) -> bytes:
    """Serialise the public part of the context (RELIABILITY 7.2: never a 500 from json.dumps).

    A context that is plain JSON already (what the nodes write) is dumped as it is: checking it costs a third
    of cleaning a copy (21 against 55 us for a crop flow's context, measured here). Anything else a hook left
    (numpy scalars, NaN, sets, odd keys) goes through `_clean`, which drops or converts it with an error entry."""
    public = {key: value for key, value in ctx.items() if key not in PRIVATE_KEYS and isinstance(key, str)}
    if _plain_json(public):
        return json.dumps(public, allow_nan=False, separators=(",", ":")).encode("utf-8")
    dropped: list[tuple[str, str]] = []
    public = {}
    for key, value in ctx.items():
        if key in PRIVATE_KEYS or not isinstance(key, str):
            continue
        cleaned = _clean(value, key, dropped)
        if cleaned is not DROPPED:
            public[key] = cleaned
    if dropped:
        errors = public.setdefault("errors", [])
        for key, message in dropped:
            errors.append({"node": "serialise", "key": key, "message": message})
        public["error"] = True
    return json.dumps(public, allow_nan=False, separators=(",", ":")).encode("utf-8")
