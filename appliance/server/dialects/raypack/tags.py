"""The `tags` of a RAYPACK /recog answer, made from the neutral Inspection for each RAYPACK model.

A tag is `{"name": str, "value": "0.12345678"}` (both strings, 8 decimals, as the document shows them); a tag is
returned when its value, as shown, reaches the request's threshold (the document sends threshold=1.0 and gets
"1.00000000"). Tags are sorted by value, best first.
"""

from __future__ import annotations

from appliance.server.dialects.raypack.food_tags import CLASSES, PARENTS
from appliance.server.inspection import Inspection, Label

DEMOGRAPHICS_DE = {"female": "weiblich", "male": "männlich"}


def value_text(value: float) -> str:
    return f"{min(1.0, max(0.0, value)):.8f}"


def _reaches(value: float, threshold: float) -> bool:
    return float(value_text(value)) >= threshold


def _imagenet_food(label: Label) -> tuple[str, str, tuple[str, ...]] | None:
    """The food map's entry when the label is that ImageNet class (same id and ImageNet's name)."""
    entry = CLASSES.get(label.id)
    return entry if entry is not None and label.name in (entry[0], entry[1]) else None


def _name(label: Label, lang: str) -> str:
    entry = _imagenet_food(label) if lang == "de" else None
    return entry[1] if entry else label.name


def _sorted(best: dict[str, float], threshold: float) -> list[dict[str, str]]:
    kept = [(name, value) for name, value in best.items() if _reaches(value, threshold)]
    kept.sort(key=lambda item: -item[1])
    return [{"name": name, "value": value_text(value)} for name, value in kept]


def _keep_best(best: dict[str, float], name: str, value: float) -> None:
    if name and value > best.get(name, -1.0):
        best[name] = value


def objects(inspection: Inspection, threshold: float, lang: str) -> list[dict[str, str]]:
    """Model 1: the classification labels and detected rectangles' labels, each name once with its best score."""
    best: dict[str, float] = {}
    for label in inspection.labels:
        _keep_best(best, _name(label, lang), label.score)
    for box in inspection.rectangles:
        _keep_best(best, box.label, box.score)
    return _sorted(best, threshold)


def food(inspection: Inspection, threshold: float, lang: str) -> list[dict[str, str]]:
    """Model 2: the food classes, and the parent tags of the ImageNet food map with the sum of their classes'
    scores (the flow lists every food class, predicted or not, so that the sums are complete)."""
    best: dict[str, float] = {}
    parents: dict[str, float] = {}
    seen: set[tuple[str, int]] = set()
    for label in inspection.labels:
        if (label.node, label.id) in seen:
            continue  # a label is counted once in its parents' sums
        seen.add((label.node, label.id))
        _keep_best(best, _name(label, lang), label.score)
        entry = _imagenet_food(label)
        for parent in entry[2] if entry else ():
            parents[parent] = parents.get(parent, 0.0) + label.score
    for parent, value in parents.items():
        _keep_best(best, PARENTS[parent] if lang == "de" else parent, value)
    return _sorted(best, threshold)


def identities(inspection: Inspection, threshold: float, lang: str) -> list[dict[str, str]]:
    """Model 3: the names of recognised enrolled people; value = 1 - distance / 1.2 (1 at descriptor distance 0,
    0.5 at dlib's same-person cut 0.6, 0 at 1.2: the imagerecognize API's scale), or the face's detection score
    when the flow gives no distance."""
    best: dict[str, float] = {}
    for face in inspection.faces:
        if face.identity:
            similarity = 1.0 - float(face.distance) / 1.2 if face.distance is not None else face.score
            _keep_best(best, str(face.identity), similarity)
    return _sorted(best, threshold)


def demographics(inspection: Inspection, threshold: float, lang: str) -> list[dict[str, str]]:
    """Model 5: per face (best detection first) `female`/`male` with the gender probability, and `age:N` (years,
    rounded) with the face's detection score: the age is an expectation over 81 one-year classes, whose best
    class rarely has more than 0.15 of the probability, so no score of the age itself could pass a threshold.
    Faces are not merged: two women give two `female` tags."""
    tags = []
    for face in sorted(inspection.faces, key=lambda f: -f.score):
        if not _reaches(face.score, threshold):
            continue
        if face.gender and face.gender_score is not None and _reaches(face.gender_score, threshold):
            name = DEMOGRAPHICS_DE.get(face.gender, face.gender) if lang == "de" else face.gender
            tags.append({"name": name, "value": value_text(face.gender_score)})
        if face.age is not None:
            prefix = "Alter" if lang == "de" else "age"
            tags.append({"name": f"{prefix}:{round(float(face.age))}", "value": value_text(face.score)})
    return tags
