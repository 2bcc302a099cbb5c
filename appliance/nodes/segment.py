"""segment@1 (PEKAT's Surface Detector): a per-pixel segmentation model; connected regions out as rectangles.

The model returns either per-class maps, 1 x C x H x W (probabilities or logits; C = 1 is one foreground
class), or a class map, 1 x H x W or 1 x 1 x H x W of integer class ids. A pixel belongs to a class when that
class is its best and its probability reaches `threshold`. Each connected region of a class (not the
`background` one) of at least `min_area` pixels becomes a rectangle with the label, its area and its mean
probability; the foreground probability is the heat map; `surfaceClasses` sums area and regions per class.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import label_name, requested
from appliance.nodes.model import ModelNode
from appliance.nodes.settings import SegmentSettings
from appliance.runtime.compiled import CompiledModel
from appliance.runtime.openvino import SEGMENT_CLASS, SEGMENT_PROBABILITY
from appliance.runtime.spec import SegmentSpec


def class_probabilities(maps: np.ndarray, activation: str) -> np.ndarray:
    """C x H x W per-class values -> probabilities of the same shape."""
    values = maps.astype(np.float32)
    if activation == "auto":
        activation = "none" if values.min() >= 0 and values.max() <= 1 else (
            "sigmoid" if values.shape[0] == 1 else "softmax")
    if activation == "softmax":
        shifted = np.exp(values - values.max(axis=0, keepdims=True))
        return shifted / shifted.sum(axis=0, keepdims=True)
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-np.clip(values, -60, 60)))
    return values


def class_map(output: np.ndarray, threshold: float, activation: str, background: int | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """A model output -> (class id per pixel, -1 where no class reaches the threshold; its probability)."""
    if np.issubdtype(output.dtype, np.integer):
        ids = output.reshape(output.shape[-2:]).astype(np.int32)
        return ids, np.ones(ids.shape, np.float32)
    maps = output.reshape(-1, *output.shape[-2:])
    probabilities = class_probabilities(maps, activation)
    if probabilities.shape[0] == 1:
        # One foreground class: id 1 when background is 0 (the usual "defect probability" map), else id 0.
        ids = np.where(probabilities[0] >= threshold, 1 if background == 0 else 0, -1).astype(np.int32)
        return ids, probabilities[0]
    best = probabilities.argmax(axis=0).astype(np.int32)
    confidence = np.take_along_axis(probabilities, best[None], axis=0)[0]
    return np.where(confidence >= threshold, best, -1), confidence


def thresholded(best: np.ndarray, probability: np.ndarray, threshold: float, classes: int, background: int | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The graph's best class and probability per pixel -> (class id, -1 under the threshold; probability)."""
    ids = best.reshape(best.shape[-2:]).astype(np.int32)
    confidence = probability.reshape(probability.shape[-2:]).astype(np.float32)
    if classes == 1:
        ids[:] = 1 if background == 0 else 0  # as class_map: one foreground class
    return np.where(confidence >= threshold, ids, -1), confidence


class Segment(ModelNode[SegmentSettings]):
    takes_gray = True
    shrinks_by_area = True
    settings_model = SegmentSettings
    spec_kind = SegmentSpec

    def _class_map(self, loaded: CompiledModel, outputs: dict[str, np.ndarray], threshold: float
                   ) -> tuple[np.ndarray, np.ndarray]:
        in_graph = getattr(loaded, "segment_outputs", None)
        wanted = self.settings.activation
        first = outputs[loaded.output_names[0]]
        if in_graph is not None and wanted in ("auto", in_graph.activation):
            return thresholded(outputs[SEGMENT_CLASS], outputs[SEGMENT_PROBABILITY], threshold,
                               first.shape[1] if first.ndim == 4 else 1, self.settings.background)
        return class_map(np.asarray(first), threshold, wanted, self.settings.background)

    def run(self, ctx: Context) -> None:
        loaded = self.loaded()
        fitted = self.fit(ctx["image"], loaded)
        outputs = loaded.infer(fitted.batch)
        threshold = float(requested(ctx, self.settings, "threshold",
                                    requested(ctx, self.settings, "min_confidence", self.settings.threshold)))
        ids, confidence = self._class_map(loaded, outputs, threshold)
        self.record(ctx, loaded)
        to_image = fitted.to_image(*ids.shape)
        sx, sy = to_image[0, 0], to_image[1, 1]
        foreground = ids >= 0
        if self.settings.background is not None:
            foreground &= ids != self.settings.background
        # Heat: the probability of the pixel's class where it is foreground, scaled so the threshold is 0.5.
        heat = np.where(foreground, np.clip(confidence / (2 * max(threshold, 1e-6)), 0, 1), 0).astype(np.float32)
        ctx["heatmaps"].append({"node": self.id, "map": heat, "to_frame": ctx.to_frame @ to_image})
        regions: list[tuple[float, int, Any]] = []
        for class_id in np.unique(ids[foreground]):
            mask = (ids == class_id).astype(np.uint8)
            count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            # Every region's probability sum in one pass over the map, not one pass per region.
            sums = np.bincount(labels.reshape(-1), weights=confidence.reshape(-1), minlength=count)
            for index in range(1, count):
                x, y, w, h, area = stats[index]
                image_area = float(area * sx * sy)
                if image_area >= self.settings.min_area:
                    regions.append((image_area, int(class_id), (x, y, w, h, float(sums[index] / area))))
        regions.sort(key=lambda region: -region[0])
        limit = int(requested(ctx, self.settings, "max_labels", self.settings.max_labels))
        summary: dict[int, dict[str, Any]] = {}
        # Areas are reported in input-frame pixels, like the rectangles (crops and resizes before the node).
        to_frame_area = abs(float(np.linalg.det(ctx.to_frame[:2, :2])))
        for image_area, class_id, (x, y, w, h, mean_confidence) in regions[:limit]:
            label = self.label(loaded, class_id)
            rectangle = ctx.add_rectangle(self.id, x * sx, y * sy, w * sx, h * sy, label=label_name(label, ctx),
                                          confidence=mean_confidence, source_type="SURFACE",
                                          color=label.color, class_id=class_id)
            frame_area = round(image_area * to_frame_area)
            rectangle["area"] = frame_area
            entry = summary.setdefault(class_id, {"id": class_id, "label": label_name(label, ctx), "area": 0,
                                                  "regions": 0, **({"color": label.color} if label.color else {})})
            entry["area"] += frame_area
            entry["regions"] += 1
        ctx["surfaceClasses"] = list(summary.values())
