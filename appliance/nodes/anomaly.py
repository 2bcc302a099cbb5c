"""anomaly@1: an anomaly model on the image (or the ROI before it): score, threshold, heat map, and rectangles
around the anomalous regions (type UNSUPERVISED).

Runs models trained by `appliance train anomaly` and anomaly models exported by anomalib to OpenVINO: both
take an image and return `pred_score` and `anomaly_map`; spec.yaml says the input format and thresholds.
The node sets `score` and `threshold`; an evaluate@1 rule (`score_below`) turns them into the verdict.
"""

from __future__ import annotations

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import Node, NodeEnvironment, NodeError, requested, spec_of, stored_spec
from appliance.nodes.settings import AnomalySettings
from appliance.runtime.models import ModelSlot
from appliance.runtime.spec import AnomalySpec


class Anomaly(Node[AnomalySettings]):
    settings_model = AnomalySettings
    # Anomaly scores are distances, not probabilities: any positive threshold.
    override_ranges = {"threshold": (1e-6, 1e6)}

    @classmethod
    def check(cls, settings: AnomalySettings, env: NodeEnvironment) -> list[tuple[tuple[str | int, ...], str]]:
        if set(settings.overrides) - {"threshold"}:
            return [(("overrides",), "anomaly@1 takes only `threshold` from a request")]
        spec, problems = stored_spec(settings.model, env, AnomalySpec)
        if spec is None:
            return problems
        if spec.threshold is None and settings.threshold is None:
            return [(("threshold",), f"model '{settings.model}' has no threshold in its spec.yaml; set one here")]
        return []

    def prepare(self) -> None:
        assert self.env.runtime is not None
        self.slot: ModelSlot = self.env.runtime.slot(self.settings.model, self.settings.device)
        if self.slot.current is None:
            self.slot.load()

    def run(self, ctx: Context) -> None:
        loaded = self.slot.current
        assert loaded is not None
        image = ctx["image"]
        if image.ndim != 3 or image.shape[2] != 3:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else None
        if image is None:
            raise NodeError(f"needs a gray or BGR image, got shape {ctx['image'].shape}")
        height, width = image.shape[:2]
        if height < 2 or width < 2:
            raise NodeError(f"image {width}x{height} is too small for model '{loaded.name}'")
        model_h, model_w = loaded.input_size
        interpolation = cv2.INTER_AREA if height * width > model_h * model_w else cv2.INTER_LINEAR
        batch = cv2.resize(image, (model_w, model_h), interpolation=interpolation)[None]
        outputs = loaded.infer(batch)
        spec = spec_of(loaded, AnomalySpec)
        score = float(np.asarray(outputs[spec.outputs.score]).reshape(-1)[0])
        raw_map = np.asarray(outputs[spec.outputs.map], np.float32)
        anomaly_map: np.ndarray = raw_map.reshape(raw_map.shape[-2], raw_map.shape[-1])
        threshold = requested(ctx, self.settings, "threshold", self.settings.threshold or spec.threshold)
        assert threshold is not None  # check() refuses a model without one
        pixel_threshold = self.settings.pixel_threshold or spec.pixel_threshold or threshold
        ctx["score"], ctx["threshold"] = score, float(threshold)
        ctx.setdefault("models", []).append({"node": self.id, "model": loaded.name, "version": loaded.version,
                                            "device": loaded.device})
        # Map pixels -> pixels of this node's image, on pixel centres.
        map_h, map_w = raw_map.shape[-2], raw_map.shape[-1]
        sx, sy = width / map_w, height / map_h
        to_image = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
        # Scaled so that the pixel threshold sits in the middle of the colour map.
        heat = np.clip(anomaly_map / (2 * pixel_threshold), 0, 1)
        ctx["heatmaps"].append({"node": self.id, "map": heat, "to_frame": ctx.to_frame @ to_image})
        if score < threshold:
            return
        regions = (anomaly_map > pixel_threshold).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(regions, connectivity=8)
        for index in range(1, count):
            x, y, w, h, area = stats[index]
            if area * sx * sy < self.settings.min_area:
                continue
            peak = float(anomaly_map[labels == index].max())
            ctx.add_rectangle(self.id, x * sx, y * sy, w * sx, h * sy, label=self.settings.label,
                              confidence=min(1.0, peak / (2 * pixel_threshold)), source_type="UNSUPERVISED",
                              color=self.settings.color)
