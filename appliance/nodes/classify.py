"""classify@1: the top labels of a classification model for the image (or the ROI before it).

Exclusive labels (one class per image, the spec's `exclusive: true`) are scored with softmax, multi-label
models with a sigmoid per label, unless the model already outputs probabilities. A label is predicted when
its score reaches its threshold (`thresholds` per label name, else `threshold`); the rest are discarded and
listed only with `show_discarded`. `only` keeps a subset of the labels (e.g. ImageNet's food classes for a
food capability): the others are never listed, and the kept ones keep the scores the model gave them over all
its labels (no renormalisation: measured on efficientnet_lite0, skimage's chelsea has 0.4 % of its probability
on the 46 food classes, which renormalised would have made broccoli a 13 % "food" answer for a cat; the coffee
keeps espresso 0.942). Results go to `classNames` (PEKAT's shape: id, label, confidence in
percent, colour) and `classification` (scores and thresholds); an evaluate@1 rule `top_class` turns them into
the verdict.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import Node, NodeEnvironment, NodeError, label_name, requested, stored_spec
from appliance.nodes.settings import ClassifySettings
from appliance.runtime.models import LoadedModel, ModelSlot
from appliance.runtime.spec import ClassifySpec, LabelSpec


def _crop_centre(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


def scores_from_outputs(raw: np.ndarray, exclusive: bool, activation: str) -> np.ndarray:
    """Probabilities from a model's class outputs (1-D)."""
    values = raw.astype(np.float64).reshape(-1)
    if activation == "auto":
        looks_like_probabilities = values.min() >= 0 and values.max() <= 1 and (
            not exclusive or abs(values.sum() - 1) < 1e-3)
        activation = "none" if looks_like_probabilities else ("softmax" if exclusive else "sigmoid")
    if activation == "softmax":
        shifted = np.exp(values - values.max())
        return shifted / shifted.sum()
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-np.clip(values, -60, 60)))
    return values


class Classify(Node[ClassifySettings]):
    settings_model = ClassifySettings

    @classmethod
    def check(cls, settings: ClassifySettings, env: NodeEnvironment) -> list[tuple[tuple[str | int, ...], str]]:
        spec, problems = stored_spec(settings.model, env, ClassifySpec)
        if spec is None:
            return problems
        names = {label.name for label in spec.labels}
        ids = {label.id for label in spec.labels}
        for position, wanted in enumerate(settings.only):
            if wanted not in (ids if isinstance(wanted, int) else names):
                problems.append((("only", position), f"model '{settings.model}' has no label {wanted!r}"))
        for name, value in settings.thresholds.items():
            if name not in names:
                problems.append((("thresholds", name), f"model '{settings.model}' has no label '{name}'"))
            elif not 0 <= value <= 1:
                problems.append((("thresholds", name), f"must be from 0 to 1, got {value}"))
        return problems

    def prepare(self) -> None:
        assert self.env.runtime is not None
        self.slot: ModelSlot = self.env.runtime.slot(self.settings.model, self.settings.device)
        if self.slot.current is None:
            self.slot.load()

    def _label(self, loaded: LoadedModel, index: int) -> LabelSpec:
        """The spec's label for output ``index`` (labels are keyed by id), or a name made from the index."""
        if getattr(self, "_labels_of", None) is not loaded:  # a version switch brings other labels
            self._labels_by_id = {label.id: label for label in loaded.spec.labels}
            self._labels_of = loaded
        return self._labels_by_id.get(index) or LabelSpec(id=index, name=f"class {index}", color=None)

    def _kept(self, loaded: LoadedModel, count: int) -> np.ndarray | None:
        """The output indices `only` keeps (None: all), resolved against the loaded version's labels."""
        if not self.settings.only:
            return None
        if getattr(self, "_kept_of", None) is not loaded:
            by_name = {label.name: label.id for label in loaded.spec.labels}
            wanted = (item if isinstance(item, int) else by_name.get(item, -1) for item in self.settings.only)
            self._kept_indices = np.array(sorted({i for i in wanted if 0 <= i < count}), dtype=np.int64)
            self._kept_of = loaded
        return self._kept_indices

    def run(self, ctx: Context) -> None:
        loaded = self.slot.current
        assert loaded is not None
        image = ctx["image"]
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if image.shape[0] < 2 or image.shape[1] < 2:
            raise NodeError(f"image {image.shape[1]}x{image.shape[0]} is too small for model '{loaded.name}'")
        if self.settings.fit == "center_crop":
            image = _crop_centre(image)
        model_h, model_w = loaded.input_size
        interpolation = cv2.INTER_AREA if image.shape[0] * image.shape[1] > model_h * model_w else cv2.INTER_LINEAR
        outputs = loaded.infer(cv2.resize(image, (model_w, model_h), interpolation=interpolation)[None])
        scores = scores_from_outputs(outputs[loaded.output_names[0]], loaded.spec.exclusive, self.settings.activation)
        default = float(requested(ctx, self.settings, "threshold",
                                  requested(ctx, self.settings, "min_confidence", self.settings.threshold)))
        overridden = default != self.settings.threshold
        limit = int(requested(ctx, self.settings, "max_labels", self.settings.max_predictions))
        predicted: list[dict[str, Any]] = []
        discarded: list[dict[str, Any]] = []
        colours: list[str | None] = []
        # Scores fall along the loop: under the lowest threshold nothing more can be predicted.
        lowest = default if overridden else min([default, *self.settings.thresholds.values()])
        kept = self._kept(loaded, scores.size)
        order = np.argsort(-scores, kind="stable") if kept is None else kept[np.argsort(-scores[kept], kind="stable")]
        for index in order:
            done_predicting = len(predicted) >= limit or scores[index] < lowest
            if done_predicting and (not self.settings.show_discarded or len(discarded) >= limit):
                break
            label = self._label(loaded, int(index))
            # A request's threshold replaces the per-label ones too: the caller asked for one bar.
            threshold = default if overridden else self.settings.thresholds.get(label.name, default)
            entry = {"label_id": label.id, "label_name": label_name(label, ctx), "score": float(scores[index]),
                     "threshold": threshold}
            if scores[index] >= threshold and len(predicted) < limit:
                predicted.append(entry)
                colours.append(label.color)
            elif self.settings.show_discarded and len(discarded) < limit:
                discarded.append(entry)
        ctx["classNames"] = [
            {"id": entry["label_id"], "label": entry["label_name"], "confidence": round(entry["score"] * 100),
             **({"color": colour} if colour else {})}
            for entry, colour in zip(predicted, colours, strict=True)]
        result: dict[str, Any] = {"node": self.id, "predicted": predicted}
        if self.settings.show_discarded:
            result["discarded"] = discarded
        ctx.setdefault("classification", []).append(result)
        ctx.setdefault("models", []).append({"node": self.id, "model": loaded.name, "version": loaded.version,
                                            "device": loaded.device})
