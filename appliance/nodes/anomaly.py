"""anomaly@1: an anomaly model on the image (or the ROI before it): score, threshold, heat map, and rectangles
around the anomalous regions (type UNSUPERVISED).

Runs models trained by `appliance train anomaly` and anomaly models exported by anomalib to OpenVINO: both
take an image and return `pred_score` and `anomaly_map`; spec.yaml says the input format and thresholds.
The node sets `score` and `threshold`; an evaluate@1 rule (`score_below`) turns them into the verdict.

Regions are cut by hysteresis, as Canny cuts edges: a region is a connected part of the map above the pixel
threshold that reaches the image threshold somewhere. The pixel threshold says how far a defect extends, the image
threshold that it is one: a part of the map that would not fail the part on its own gets no rectangle, and a
defect whose map dips between two peaks stays one rectangle. Where the two thresholds are equal (the memory bank's
good-only rule) this is the plain cut at the threshold. The discriminator needs it: its threshold sits far above
what good pixels reach (demo tiles: 6.3 against 1.07 for the 99.9th percentile of held-out good pixels), and a
thin scratch's map, 12.6 where it crosses the mortar and 2.6 on the dark brick between, fell apart at 6.3 into two
pieces that missed the scratch's centre.
"""

from __future__ import annotations

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import NodeError, Problems, requested, spec_of
from appliance.nodes.model import ModelNode
from appliance.nodes.settings import AnomalySettings
from appliance.runtime.spec import AnomalySpec, ModelSpec


class Anomaly(ModelNode[AnomalySettings]):
    takes_gray = True
    shrinks_by_area = True
    settings_model = AnomalySettings
    spec_kind = AnomalySpec

    @classmethod
    def check_spec(cls, settings: AnomalySettings, spec: ModelSpec) -> Problems:
        assert isinstance(spec, AnomalySpec)
        if spec.threshold is None and settings.threshold is None:
            return [(("threshold",), f"model '{settings.model}' has no threshold in its spec.yaml; set one here")]
        return []

    def run(self, ctx: Context) -> None:
        loaded = self.loaded()
        fitted = self.fit(ctx["image"], loaded)
        outputs = loaded.infer(fitted.batch)
        spec = spec_of(loaded, AnomalySpec)
        score = float(np.asarray(outputs[spec.outputs.score]).reshape(-1)[0])
        raw_map = np.asarray(outputs[spec.outputs.map], np.float32)
        if raw_map.ndim < 2:
            raise NodeError(f"model '{loaded.name}' version {loaded.version}: output {spec.outputs.map} of shape "
                            f"{list(raw_map.shape)} is not a map")
        anomaly_map: np.ndarray = raw_map.reshape(raw_map.shape[-2], raw_map.shape[-1])
        threshold = requested(ctx, self.settings, "threshold", self.settings.threshold or spec.threshold)
        assert threshold is not None  # check() refuses a model without one
        pixel_threshold = self.settings.pixel_threshold or spec.pixel_threshold or threshold
        ctx["score"], ctx["threshold"] = score, float(threshold)
        self.record(ctx, loaded)
        # Map pixels -> pixels of this node's image, on pixel centres.
        to_image = fitted.to_image(*anomaly_map.shape)
        sx, sy = to_image[0, 0], to_image[1, 1]
        # Scaled so that the image threshold sits in the middle of the colour map: red where a pixel alone would
        # fail the part. (A pixel threshold below it marks how far a region extends, not how bad it is: at the
        # discriminator's, good tiles would show red spots.)
        heat = np.clip(anomaly_map / (2 * threshold), 0, 1)
        ctx["heatmaps"].append({"node": self.id, "map": heat, "to_frame": ctx.to_frame @ to_image})
        if score < threshold:
            return
        regions = (anomaly_map > pixel_threshold).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(regions, connectivity=8)
        for index in range(1, count):
            x, y, w, h, area = stats[index]
            if area * sx * sy < self.settings.min_area:
                continue
            # The region's peak, looked for inside its bounding box only (not over the whole map per region).
            inside = labels[y:y + h, x:x + w] == index
            peak = float(anomaly_map[y:y + h, x:x + w][inside].max())
            if peak < threshold:
                continue  # hysteresis (module docstring): this region would not fail the part on its own
            ctx.add_rectangle(self.id, x * sx, y * sy, w * sx, h * sy, label=self.settings.label,
                              confidence=min(1.0, peak / (2 * threshold)),
                              source_type="UNSUPERVISED", color=self.settings.color)
