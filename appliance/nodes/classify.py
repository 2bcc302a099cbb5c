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

import numpy as np

from appliance.context import Context
from appliance.nodes.base import Problems, label_name, requested
from appliance.nodes.model import ModelNode
from appliance.nodes.settings import ClassifySettings
from appliance.runtime.compiled import CompiledModel
from appliance.runtime.spec import ClassifySpec, ModelSpec


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


class Classify(ModelNode[ClassifySettings]):
    takes_gray = True
    settings_model = ClassifySettings
    spec_kind = ClassifySpec

    @classmethod
    def check_spec(cls, settings: ClassifySettings, spec: ModelSpec) -> Problems:
        problems: Problems = []
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

    def _kept(self, loaded: CompiledModel, count: int) -> np.ndarray | None:
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
        loaded = self.loaded()
        outputs = loaded.infer(self.fit(ctx["image"], loaded, self.settings.fit).batch)
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
            label = self.label(loaded, int(index))
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
        self.record(ctx, loaded)
