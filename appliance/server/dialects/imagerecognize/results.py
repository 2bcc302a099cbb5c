"""The `objects` list of an imagerecognize answer, made from the neutral Inspection, one function per type.

Every entry is `{"name", "confidence", "coordinates"}`: confidence 0-100 (two decimals, as the document's 99.87),
coordinates a list of `{"x", "y", "width", "height"}` in fractions of the image (four decimals), empty for a
label that has no place (a classification of the whole picture).
"""

from __future__ import annotations

from typing import Any

from appliance.server.inspection import Box, Inspection

# Labels of an NSFW classifier that mean "safe": `nsfw` answers only the others (see docs/apis.md).
SAFE_LABELS = frozenset({"sfw", "safe", "neutral", "normal", "drawings"})


def percent(score: float) -> float:
    return round(min(1.0, max(0.0, float(score))) * 100, 2)


def place(x: float, y: float, width: float, height: float, size: tuple[int, int]) -> dict[str, float]:
    """A rectangle in frame pixels as fractions of the frame, clipped to it."""
    frame_w, frame_h = max(1, size[0]), max(1, size[1])
    x0, y0 = min(max(x, 0.0), frame_w), min(max(y, 0.0), frame_h)
    x1, y1 = min(max(x + width, 0.0), frame_w), min(max(y + height, 0.0), frame_h)
    return {"x": round(x0 / frame_w, 4), "y": round(y0 / frame_h, 4), "width": round((x1 - x0) / frame_w, 4),
            "height": round((y1 - y0) / frame_h, 4)}


def _grouped(boxes: list[Box], size: tuple[int, int], min_score: float) -> list[tuple[float, dict[str, Any]]]:
    """Rectangles of one label together, as the document's "Car" with its list of coordinates."""
    groups: dict[str, list[Box]] = {}
    for box in sorted(boxes, key=lambda b: -b.score):
        if box.score >= min_score:
            groups.setdefault(box.label, []).append(box)
    return [(found[0].score, {"name": name, "confidence": percent(found[0].score),
                              "coordinates": [place(b.x, b.y, b.width, b.height, size) for b in found]})
            for name, found in groups.items()]


def _labels(inspection: Inspection, min_score: float, *, predicted_only: bool,
            skip: set[str]) -> list[tuple[float, dict[str, Any]]]:
    best: dict[str, float] = {}
    for label in inspection.labels:
        if (label.predicted or not predicted_only) and label.name not in skip and label.score >= min_score:
            best[label.name] = max(label.score, best.get(label.name, 0.0))
    return [(score, {"name": name, "confidence": percent(score), "coordinates": []}) for name, score in best.items()]


def _best_first(entries: list[tuple[float, dict[str, Any]]], limit: int | None) -> list[dict[str, Any]]:
    entries.sort(key=lambda entry: -entry[0])
    return [entry for _, entry in entries[:limit]]


def objects(inspection: Inspection, max_labels: int | None, min_confidence: float | None) -> list[dict[str, Any]]:
    """type=objects: a detector's rectangles grouped by label, and a classifier's predicted labels without
    coordinates; `min_confidence` (0-100) and `max_labels` applied here whatever the flow allows."""
    min_score = (min_confidence or 0.0) / 100
    grouped = _grouped(inspection.rectangles, inspection.frame_size, min_score)
    found = grouped + _labels(inspection, min_score, predicted_only=True, skip={e["name"] for _, e in grouped})
    return _best_first(found, max_labels)


def faces(inspection: Inspection) -> list[dict[str, Any]]:
    """type=detect_faces: one "Face" per face, with age, gender and identity when the flow finds them."""
    found = []
    for face in sorted(inspection.faces, key=lambda f: -f.score):
        entry: dict[str, Any] = {"name": "Face", "confidence": percent(face.score),
                                 "coordinates": [place(face.x, face.y, face.width, face.height,
                                                       inspection.frame_size)]}
        if face.age is not None:
            entry["age"] = round(float(face.age), 1)
            if face.age_confidence is not None:
                entry["age_confidence"] = percent(face.age_confidence)
        if face.gender is not None:
            entry["gender"] = face.gender
            if face.gender_score is not None:
                entry["gender_confidence"] = percent(face.gender_score)
        if face.identity:
            entry["identity"] = face.identity
        found.append(entry)
    return found


def text(inspection: Inspection) -> list[dict[str, Any]]:
    """type=detect_text: one entry per line in reading order, its name the text read."""
    found = []
    for line in inspection.text:
        if not line.text.strip():
            continue
        coordinates = []
        if line.corners:
            xs, ys = [x for x, _ in line.corners], [y for _, y in line.corners]
            coordinates = [place(min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys), inspection.frame_size)]
        found.append({"name": line.text, "confidence": percent(line.score), "coordinates": coordinates})
    return found


def nsfw(inspection: Inspection, min_confidence: float) -> list[dict[str, Any]]:
    """type=nsfw: the unsafe labels (not sfw/safe/neutral/normal/drawings) at `nsfw_min_confidence` or more,
    as Rekognition's moderation labels: an empty list is a safe picture."""
    min_score = min_confidence / 100
    unsafe = [box for box in inspection.rectangles if box.label.lower() not in SAFE_LABELS]
    grouped = _grouped(unsafe, inspection.frame_size, min_score)
    skip = {e["name"] for _, e in grouped} | {label.name for label in inspection.labels
                                              if label.name.lower() in SAFE_LABELS}
    return _best_first(grouped + _labels(inspection, min_score, predicted_only=False, skip=skip), None)


def match_confidence(distance: float | None, detection: float) -> float:
    """A recognised face's confidence from its descriptor distance: 100 at 0, 50 at dlib's same-person
    threshold 0.6, 0 at 1.2 and beyond; the detection score when the flow gives no distance."""
    if distance is None:
        return percent(detection)
    return percent(1.0 - float(distance) / 1.2)


def celebrities(inspection: Inspection) -> list[dict[str, Any]]:
    """type=celebrities: the faces the flow recognised as an enrolled person; unknown faces are left out."""
    found: list[dict[str, Any]] = []
    for face in inspection.faces:
        if not face.identity:
            continue
        found.append({"name": face.identity, "confidence": match_confidence(face.distance, face.score),
                      "coordinates": [place(face.x, face.y, face.width, face.height, inspection.frame_size)]})
    found.sort(key=lambda entry: -entry["confidence"])
    return found


def error_description(inspection: Inspection) -> str | int:
    """`data.error`: 0, or "a brief error description" (the document's words) of the nodes that failed."""
    messages = [f"{e.get('node', '?')}: {e.get('message', e.get('type', 'failed'))}" for e in inspection.errors]
    return "; ".join(messages)[:500] if messages else 0
