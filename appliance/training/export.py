"""A trained model -> a new version in the model store, through the store's one writer (runtime/store.py).

The spec says what the runtime needs (task, input, outputs, thresholds, labels) and what people want to know
(the training record: images, seconds, backbone, recipe, metrics); `publish` validates it before anything is
written, stages the files, never overwrites a version and switches `current` last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from appliance.runtime.store import FileSource, publish
from appliance.training.anomaly import RECIPE, TrainedAnomaly
from appliance.training.features import INPUT_NAME
from appliance.training.scoring import OUTPUT_MAP, OUTPUT_SCORE
from appliance.training.segment import OUTPUT, PALETTE, TrainedSegmenter


def ir_files(model: ov.Model) -> dict[str, FileSource]:
    """model.xml (save_model writes model.bin beside it) with f32 weights: fp16 rounding, save_model's default,
    would move every distance to the bank."""
    return {"model.xml": lambda path: ov.save_model(model, path, compress_to_fp16=False)}


def _input(size: int) -> dict[str, Any]:
    return {"name": INPUT_NAME, "size": [size, size], "element_type": "u8", "layout": "NHWC", "colour_order": "BGR"}


def plain(value: Any) -> Any:
    """numpy scalars, tuples and paths as plain YAML types."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def anomaly_spec(trained: TrainedAnomaly, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec of a trained anomaly model; ``source``: the images it learnt from ({good, good_images})."""
    spec: dict[str, Any] = {
        "task": "anomaly",
        "input": _input(trained.size),
        "outputs": {"score": OUTPUT_SCORE, "map": OUTPUT_MAP},
        "threshold": float(trained.threshold),
        "pixel_threshold": float(trained.pixel_threshold),
        "labels": [{"id": 1, "name": "anomaly", "color": "#ff0000"}],
        # Not read by the runtime (the firmware profile sets it); said here because bf16 shifts the scores.
        "precision": "f32",
        "training": {"images": trained.images, "seconds": trained.metrics.get("train_seconds"),
                     # The discriminator states its own recipe in its metrics; the bank's is RECIPE.
                     "backbone": trained.backbone, "recipe": trained.metrics.get("recipe", RECIPE),
                     "metrics": plain(trained.metrics)},
    }
    if source:
        spec["source"] = plain(source)
    return spec


def save_anomaly_model(trained: TrainedAnomaly, model_dir: Path, *, version: str | None = None,
                       source: dict[str, Any] | None = None, make_current: bool = True) -> str:
    """Write ``model_dir/<version>/`` (model.xml+bin, spec.yaml, manifest.json), then point ``current`` at it.

    The version defaults to one more than the highest integer version present. A version that exists is never
    overwritten (a running appliance may have it loaded): StoreError. Returns the version written.
    """
    model_dir = Path(model_dir)
    return publish(model_dir.parent, model_dir.name, ir_files(trained.model), anomaly_spec(trained, source), version,
                   make_current=make_current)


def segmenter_spec(trained: TrainedSegmenter) -> dict[str, Any]:
    return {"task": "segment",
            "input": _input(trained.size),
            "outputs": [{"name": OUTPUT, "shape": [1, len(trained.labels) + 1, trained.size, trained.size],
                         "note": "softmax probabilities, class 0 = background"}],
            # Probabilities already: the runtime appends the best class and its probability to the graph.
            "activation": "none",
            "labels": [{"id": 0, "name": "background"}] + [{"id": i + 1, "name": name, "color": PALETTE[i % len(PALETTE)]}
                                                             for i, name in enumerate(trained.labels)],
            "training": {"metrics": plain(trained.metrics)}}


def save_segmenter(trained: TrainedSegmenter, model_dir: Path, version: str | None = None) -> str:
    """``model_dir/<version>/`` with the network, spec.yaml and manifest.json; ``current`` switched to it."""
    model_dir = Path(model_dir)
    return publish(model_dir.parent, model_dir.name, ir_files(trained.model), segmenter_spec(trained), version)
