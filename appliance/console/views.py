"""What the console shows of an inspection, a model store and a flow, as JSON for the page: pure functions of a
context, a folder or a compiled graph (no HTTP, no threads)."""

from __future__ import annotations

import base64
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from appliance.context import Context
from appliance.flow.graph import FlowGraph
from appliance.server import render
from appliance.server.inspection import Inspection

# Longest side of the pictures pushed to the live view and kept as gallery previews, at most: enough for a browser
# panel, and a 1080p frame costs 4x less to draw and encode at this size.
PREVIEW_SIDE = 960
PREVIEW_QUALITY = 75


def decided_by(ctx: dict[str, Any]) -> list[dict[str, str]]:
    """The nodes that decided the verdict and why: a failed node (its error makes the part NG), else each
    evaluate@1 rule that failed (NG) or passed (OK); a verdict no evaluation explains was set by a Code hook,
    named as the last node that ran."""
    verdict = bool(ctx.get("result"))
    found = [{"node": str(error.get("node", "")), "reason": str(error.get("message", ""))[:300]}
             for error in ctx.get("errors") or [] if isinstance(error, dict)]
    if found and not verdict:
        return found
    for outcome in ctx.get("evaluation") or []:
        if isinstance(outcome, dict) and bool(outcome.get("passed")) == verdict:
            found.append({"node": str(outcome.get("node", "")),
                          "reason": f"{outcome.get('rule', '')}: {outcome.get('detail', '')}"})
    if not found:
        # No evaluation explains it: a Code hook set `result`; the last node that ran is the best guess of which.
        timings = ctx.get("timings") or []
        last = str(timings[-1][0]) if timings and isinstance(timings[-1], (list, tuple)) else ""
        found.append({"node": last, "reason": "result set by a Code hook" if not verdict else "no rule failed"})
    return found


def nodes_involved(ctx: dict[str, Any]) -> list[str]:
    """The nodes a gallery filter finds a frame by: those that decided, and those that drew its rectangles."""
    nodes = [entry["node"] for entry in decided_by(ctx) if entry["node"]]
    for rectangle in ctx.get("detectedRectangles") or []:
        source = rectangle.get("source") if isinstance(rectangle, dict) else None
        node = source.get("moduleId") if isinstance(source, dict) else None
        if isinstance(node, str) and node:
            nodes.append(node)
    return sorted(set(nodes))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary(ctx: Context) -> dict[str, Any]:
    """The verdict and what explains it: score against threshold, rectangles in frame pixels, per-node times."""
    inspection = Inspection(ctx)
    width, height = inspection.frame_size
    return {
        "verdict": inspection.verdict,
        "score": _finite(inspection.score),
        "threshold": _finite(inspection.threshold),
        "frame": {"width": width, "height": height},
        "rectangles": [{"x": box.x, "y": box.y, "width": box.width, "height": box.height, "label": box.label,
                        "score": round(box.score, 4), "node": box.node} for box in inspection.rectangles],
        "timings": [[node, round(seconds * 1000, 3)] for node, seconds in inspection.timings],
        "decided_by": decided_by(ctx),
        "errors": [{"node": str(error.get("node", "")), "message": str(error.get("message", ""))[:300]}
                   for error in inspection.errors],
        "models": inspection.models,
        "data": str(ctx.get("data") or "")[:200],
        "processing_ms": round(inspection.processing_seconds * 1000, 3),
    }


def _scaled(ctx: Context, side: int) -> Context:
    """A shallow copy of ``ctx`` whose image is at most ``side`` px on its longest side; its geometry follows,
    so rectangles and heat maps land where render.annotated would put them on the full image."""
    small = Context(ctx)
    small.to_frame = ctx.to_frame
    image = ctx["image"]
    height, width = image.shape[:2]
    # A whole divisor: OpenCV's area resize has a fast path for it (a 1280x800 image halved: 0.8 ms of CPU, against
    # 10.9 ms to 960x600, measured here), and the live view draws up to 5 of these a second beside the line.
    divisor = math.ceil(max(height, width) / side)
    if divisor > 1:
        size = (max(1, width // divisor), max(1, height // divisor))
        small["image"] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        small.to_frame = ctx.to_frame @ np.diag([width / size[0], height / size[1], 1.0])
    return small


def preview(ctx: Context, *, heat: bool, side: int = PREVIEW_SIDE) -> np.ndarray:
    """The annotated image (verdict, rectangles, and the heat map when ``heat``), at most ``side`` px."""
    small = _scaled(ctx, side)
    if not heat:
        small["heatmaps"] = []
    return render.annotated(small)


def heatmap_preview(ctx: Context, side: int = PREVIEW_SIDE) -> np.ndarray:
    """The heat map alone (black where no node made one), at most ``side`` px."""
    return render.heatmap(_scaled(ctx, side))


def jpeg_data_url(image: np.ndarray, quality: int = PREVIEW_QUALITY) -> str:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("the preview could not be encoded")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.tobytes()).decode("ascii")


def _version_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def model_versions(model_dir: Path) -> list[dict[str, Any]]:
    """Every version of a model in the store, oldest first, with what its spec.yaml says of it."""
    if not model_dir.is_dir():
        return []
    versions = []
    for version_dir in sorted((p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                              key=lambda p: _version_key(p.name)):
        spec_path = version_dir / "spec.yaml"
        try:
            loaded = yaml.safe_load(spec_path.read_text())
        except (OSError, yaml.YAMLError):
            loaded = None
        spec: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
        training = _mapping(spec.get("training"))
        metrics = _mapping(training.get("metrics"))
        try:
            written = spec_path.stat().st_mtime
        except OSError:
            written = version_dir.stat().st_mtime
        size = _mapping(spec.get("input")).get("size")
        versions.append({
            "version": version_dir.name, "task": spec.get("task"), "threshold": spec.get("threshold"),
            "size": size[0] if isinstance(size, list) and size else None,
            "image_auroc": metrics.get("image_auroc"), "pixel_auroc": metrics.get("pixel_auroc"),
            "images": training.get("images"), "seconds": training.get("seconds"),
            "threshold_rule": metrics.get("threshold_rule"), "date": time.strftime("%Y-%m-%d %H:%M",
                                                                                    time.localtime(written)),
            "written": written,
        })
    return versions


def _plain(value: Any) -> Any:
    """Settings as JSON: paths and other objects as text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def flow_graph(graph: FlowGraph) -> dict[str, Any]:
    """Nodes (id, type, settings without `type` and `next`), edges and first nodes, for drawing."""
    nodes = []
    for node_id, node in graph.nodes.items():
        settings = node.settings.model_dump(exclude={"type", "next"}, exclude_defaults=True, mode="json")
        nodes.append({"id": node_id, "type": node.settings.type, "settings": _plain(settings),
                      "next": list(graph.successors.get(node_id, []))})
    return {"nodes": nodes, "roots": list(graph.roots)}
