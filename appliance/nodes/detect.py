"""detect@1: boxes from an object detection model (or the ROI before it), as DETECTION rectangles.

Detection models disagree on how they lay out their outputs, so a decoder turns each layout into the same
candidates (boxes as fractions of the model input, scores, class ids). The spec's `outputs` names the decoder
and the outputs it reads (`decoder` on the node replaces the spec's):

- `ssd`: one `[1, 1, N, 7]` output (image_id, label, confidence, x0, y0, x1, y1 normalised), as OpenVINO's
  DetectionOutput writes it; a row with image_id -1 ends the valid rows.
- `yolo`: one `[1, 4 + C, N]` output (cx, cy, w, h in input pixels, then C class scores), Ultralytics' export;
  `yolo_transposed`: the same as `[1, N, 4 + C]`.
- `separate`: `boxes` `[1, N, 4]`, `scores` `[1, N]` (or `[1, N, C]`: the best class wins) and optional `labels`
  `[1, N]`; `box_format` xyxy (default), yxyx (TensorFlow), xywh or cxcywh, `normalized` (default true).
- `blazeface`: MediaPipe's anchor SSD (`boxes` `[1, N, 4 + 2K]` regressors, `scores` `[1, N, 1]` logits) with
  `anchors: {strides, offset}`; the anchors are fixed-size, so a box is its anchor centre plus the regressor.

Candidates under the confidence are dropped, then non-maximum suppression runs per class (OpenCV's
NMSBoxesBatched); `weighted` NMS (MediaPipe's, the default for BlazeFace) replaces each kept box by the
score-weighted mean of the boxes it suppressed. faces@1 runs the same code through `DetectionNode`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import NodeError, Problems, label_name, requested, spec_of
from appliance.nodes.model import ModelNode
from appliance.nodes.settings import DetectionSettings, DetectSettings
from appliance.runtime.compiled import CompiledModel
from appliance.runtime.spec import DECODERS, Anchors, BoxFormat, DecoderName, DetectSpec, LabelSpec, ModelSpec
from appliance.runtime.store import StoreError

# What each decoder's models were trained with, used where neither the node nor the spec says otherwise:
# YOLO and BlazeFace see letterboxed inputs in training, SSD exports usually stretched ones; MediaPipe merges
# BlazeFace boxes with weighted NMS at IoU 0.3 (MODELS.md 1), Ultralytics suppresses at 0.45.
_FAMILY_FIT = {"ssd": "stretch", "separate": "stretch", "yolo": "letterbox", "yolo_transposed": "letterbox",
               "blazeface": "letterbox"}
_FAMILY_IOU = {"blazeface": 0.3}
_DEFAULT_IOU = 0.45


@dataclass(frozen=True)
class Candidates:
    """A frame's raw detections: boxes (x0, y0, x1, y1) as fractions of the model input's width and height;
    keypoints (N x K x 2, x and y as the same fractions) where the model gives them (BlazeFace)."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    keypoints: np.ndarray | None = None


@dataclass(frozen=True)
class Detection:
    """A kept box, in pixels of the node's image (x1, y1 exclusive edges, inside the image)."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    label: LabelSpec
    keypoints: tuple[tuple[float, float], ...] = ()  # (x, y) in pixels of the node's image, the model's order


def _rows(array: np.ndarray, width: int, what: str) -> np.ndarray:
    """Flatten the leading (batch) axes of an output whose last axis must have ``width`` values or more."""
    if array.ndim == 0 or array.shape[-1] < width:
        raise ValueError(f"{what}: expected a last axis of {width}+ values, got shape {list(array.shape)}")
    return array.reshape(-1, array.shape[-1]).astype(np.float32)


def decode_ssd(detections: np.ndarray) -> Candidates:
    rows = _rows(detections, 7, "ssd output")
    if rows.shape[1] != 7:
        raise ValueError(f"ssd output: expected [1, 1, N, 7], got shape {list(detections.shape)}")
    # DetectionOutput pads its fixed N rows after the last detection, starting with image_id -1.
    ends = np.flatnonzero(rows[:, 0] < 0)
    if ends.size:
        rows = rows[:ends[0]]
    return Candidates(rows[:, 3:7], rows[:, 2], rows[:, 1].astype(np.int64))


def _from_cxcywh(cx: np.ndarray, cy: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def decode_yolo(output: np.ndarray, input_size: tuple[int, int], transposed: bool) -> Candidates:
    """Ultralytics' layout: per box cx, cy, w, h in input pixels and one score per class (no objectness)."""
    if output.ndim < 2:
        raise ValueError(f"yolo output: expected [1, 4 + C, N], got shape {list(output.shape)}")
    table = output.reshape(output.shape[-2], output.shape[-1]).astype(np.float32)
    if transposed:
        table = table.T
    if table.shape[0] < 5:
        raise ValueError(f"yolo output: expected 4 box rows and at least one class row, got shape "
                         f"{list(output.shape)}{' (is it yolo_transposed?)' if not transposed else ''}")
    height, width = input_size
    cx, cy, w, h = table[0] / width, table[1] / height, table[2] / width, table[3] / height
    class_scores = table[4:]
    class_ids = class_scores.argmax(axis=0)
    return Candidates(_from_cxcywh(cx, cy, w, h), class_scores[class_ids, np.arange(table.shape[1])],
                      class_ids.astype(np.int64))


def decode_separate(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray | None, box_format: BoxFormat,
                    normalized: bool, input_size: tuple[int, int]) -> Candidates:
    table = _rows(boxes, 4, "boxes output")[:, :4]
    count = table.shape[0]
    if scores.size == count:
        best = scores.reshape(-1).astype(np.float32)
        class_ids = np.zeros(count, np.int64)
    elif count and scores.size % count == 0:
        per_class = scores.reshape(count, -1).astype(np.float32)
        class_ids = per_class.argmax(axis=1).astype(np.int64)
        best = per_class[np.arange(count), class_ids]
    else:
        raise ValueError(f"scores output of shape {list(scores.shape)} does not match {count} boxes")
    if labels is not None:
        if labels.size != count:
            raise ValueError(f"labels output of shape {list(labels.shape)} does not match {count} boxes")
        class_ids = np.rint(labels.reshape(-1)).astype(np.int64)
    a, b, c, d = table.T
    if box_format == "yxyx":
        xyxy = np.stack([b, a, d, c], axis=1)
    elif box_format == "xywh":
        xyxy = np.stack([a, b, a + c, b + d], axis=1)
    elif box_format == "cxcywh":
        xyxy = _from_cxcywh(a, b, c, d)
    else:
        xyxy = table
    if not normalized:
        height, width = input_size
        xyxy = xyxy / np.array([width, height, width, height], np.float32)
    return Candidates(xyxy, best, class_ids)


def blazeface_anchors(input_size: tuple[int, int], strides: list[int], offset: float, count: int) -> np.ndarray:
    """Anchor centres (fractions of the input), in the order the model's outputs list them.

    MediaPipe merges consecutive layers of one stride into one grid whose cells carry all their anchors one
    after the other; anchors per layer (2 for short range, 1 for full range) follow from the output's count.
    """
    height, width = input_size
    groups: list[tuple[int, int]] = []  # (stride, layers)
    for stride in strides:
        if groups and groups[-1][0] == stride:
            groups[-1] = (stride, groups[-1][1] + 1)
        else:
            groups.append((stride, 1))
    cells = sum(math.ceil(height / s) * math.ceil(width / s) * layers for s, layers in groups)
    if cells == 0 or count % cells:
        raise ValueError(f"{count} boxes do not fit anchors of strides {strides} on a {width}x{height} input")
    per_layer = count // cells
    centres = []
    for stride, layers in groups:
        rows, columns = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid((np.arange(rows) + offset) / rows, (np.arange(columns) + offset) / columns,
                             indexing="ij")
        grid = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)
        centres.append(np.repeat(grid, layers * per_layer, axis=0))
    return np.concatenate(centres).astype(np.float32)


def decode_blazeface(regressors: np.ndarray, logits: np.ndarray, anchors: np.ndarray,
                     input_size: tuple[int, int]) -> Candidates:
    table = _rows(regressors, 4, "blazeface boxes output")
    if table.shape[0] != anchors.shape[0] or logits.size != anchors.shape[0]:
        raise ValueError(f"blazeface outputs {list(regressors.shape)} and {list(logits.shape)} do not match "
                         f"{anchors.shape[0]} anchors")
    height, width = input_size
    cx = table[:, 0] / width + anchors[:, 0]
    cy = table[:, 1] / height + anchors[:, 1]
    w, h = table[:, 2] / width, table[:, 3] / height
    # The clip keeps exp() finite; MediaPipe clips the logits at ±100 too.
    scores = 1 / (1 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))
    # The keypoints follow the box: offsets from the anchor centre in input pixels (MODELS.md 1, "BlazeFace
    # decoding"); face detectors give 6 (right eye, left eye, nose tip, mouth centre, right ear, left ear,
    # the person's right and left).
    count = (table.shape[1] - 4) // 2
    points = table[:, 4:4 + 2 * count].reshape(-1, count, 2) / np.array([width, height], np.float32) + anchors[:, None]
    return Candidates(_from_cxcywh(cx, cy, w, h), scores, np.zeros(len(scores), np.int64), points)


class OutputDecoder:
    """The decoder of one loaded model: which outputs it reads, and its anchors when it has any."""

    def __init__(self, spec: DetectSpec, output_names: list[str], decoder: DecoderName | None = None):
        kind = decoder or spec.outputs.decoder
        if kind is None:
            raise ValueError(f"no output decoder: set `decoder` ({', '.join(DECODERS)}) on the node or "
                             f"outputs.decoder in spec.yaml (got {kind!r})")
        self.kind: DecoderName = kind
        self.input_size = spec.input.size
        self.config = spec.outputs
        self.output_names = output_names
        self.box_format: BoxFormat = spec.outputs.box_format
        self.normalized = spec.outputs.normalized
        self.anchors: np.ndarray | None = None

    @property
    def family_fit(self) -> str:
        return _FAMILY_FIT[self.kind]

    @property
    def family_iou(self) -> float:
        return _FAMILY_IOU.get(self.kind, _DEFAULT_IOU)

    @property
    def family_weighted(self) -> bool:
        return self.kind == "blazeface"

    def _output(self, outputs: dict[str, np.ndarray], key: str, required: bool = True) -> np.ndarray | None:
        """The output the spec names under ``key``; else one named ``key``; else the only output."""
        name = getattr(self.config, key)
        if name is None:
            if key in outputs:
                name = key
            elif len(outputs) == 1 and key == "output":
                name = next(iter(outputs))
            elif not required:
                return None
        if name not in outputs:
            raise ValueError(f"{self.kind} decoder: no output {name or key!r} (outputs: {', '.join(outputs)}); "
                             f"name it in spec.yaml as outputs.{key}")
        return outputs[name]

    def __call__(self, outputs: dict[str, np.ndarray]) -> Candidates:
        if self.kind == "ssd":
            return decode_ssd(self._require(outputs, "output"))
        if self.kind in ("yolo", "yolo_transposed"):
            return decode_yolo(self._require(outputs, "output"), self.input_size, self.kind == "yolo_transposed")
        boxes, scores = self._require(outputs, "boxes"), self._require(outputs, "scores")
        if self.kind == "separate":
            return decode_separate(boxes, scores, self._output(outputs, "labels", required=False),
                                   self.box_format, self.normalized, self.input_size)
        if self.anchors is None:
            anchors = self.config.anchors or Anchors()
            count = boxes.reshape(-1, boxes.shape[-1]).shape[0] if boxes.ndim else 0
            self.anchors = blazeface_anchors(self.input_size, list(anchors.strides), anchors.offset, count)
        return decode_blazeface(boxes, scores, self.anchors, self.input_size)

    def _require(self, outputs: dict[str, np.ndarray], key: str) -> np.ndarray:
        found = self._output(outputs, key)
        assert found is not None
        return found


def _overlaps(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x0, y0, x1, y1 box with each of ``boxes``, areas as width x height (as OpenCV's NMS)."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def select(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, *, confidence: float, iou: float,
           limit: int, weighted: bool, class_aware: bool = True, extras: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Boxes (x0, y0, x1, y1) that reach ``confidence`` and survive NMS, best first, at most ``limit``; with the
    rows of ``extras`` (per-box values such as keypoints) that go with them, merged as the boxes are."""
    passing = scores >= confidence
    boxes, scores, class_ids = boxes[passing], scores[passing], class_ids[passing]
    extras = None if extras is None else extras[passing]
    if not len(scores):
        return boxes, scores, class_ids, extras
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    # Scores were filtered above with >= (OpenCV's threshold is strict, and must be >= 0: a score of exactly 0,
    # padding in fixed-size outputs, is never a box); top_k would cut the candidates before suppression, not
    # the result, so the limit is applied afterwards.
    if class_aware:
        kept = cv2.dnn.NMSBoxesBatched(xywh, scores.tolist(), class_ids.tolist(), 0.0, iou)
    else:
        kept = cv2.dnn.NMSBoxes(xywh, scores.tolist(), 0.0, iou)
    order = np.asarray(kept, np.int64).reshape(-1)
    order = order[np.argsort(-scores[order], kind="stable")][:limit]
    kept_boxes = boxes[order].copy()
    kept_extras = None if extras is None else extras[order].copy()
    if weighted:
        # Greedy NMS suppresses a box by the best kept box that overlaps it; merging each kept box with the
        # boxes no better kept box claimed gives MediaPipe's clusters.
        claimed = np.zeros(len(scores), bool)
        for rank, index in enumerate(order):
            members = ~claimed & (_overlaps(boxes[index], boxes) > iou)
            if class_aware:
                members &= class_ids == class_ids[index]
            members[index] = True
            claimed |= members
            weights = scores[members][:, None]
            kept_boxes[rank] = (boxes[members] * weights).sum(axis=0) / weights.sum()
            if kept_extras is not None and extras is not None:
                kept_extras[rank] = (extras[members] * weights).sum(axis=0) / weights.sum()
    return kept_boxes, scores[order], class_ids[order], kept_extras


SettingsT = TypeVar("SettingsT", bound=DetectionSettings)


class DetectionNode(ModelNode[SettingsT]):
    """A node that runs a detection model: store check, loading, decoding and selection of the boxes."""

    spec_kind = DetectSpec
    tasks: ClassVar[tuple[str, ...] | None] = ("detect", "faces")

    @classmethod
    def check_spec(cls, settings: SettingsT, spec: ModelSpec) -> Problems:
        assert isinstance(spec, DetectSpec)
        try:
            OutputDecoder(spec, [], settings.decoder)
        except ValueError as error:
            return [(("decoder",), f"model '{settings.model}': {error}")]
        return cls.check_labels(settings, spec)

    @classmethod
    def check_labels(cls, settings: SettingsT, spec: DetectSpec) -> Problems:
        return []

    def prepare(self) -> None:
        super().prepare()
        loaded = self.loaded()
        # A layout that does not fit the decoder is a configuration problem: say so before serving.
        try:
            self._decoder(loaded)[0](loaded.infer(np.zeros((1, *loaded.input_size, 3), np.uint8)))
        except ValueError as error:
            raise StoreError(f"model '{loaded.name}' version {loaded.version}: {self.settings.type} node "
                             f"'{self.id}': {error}") from None

    def _decoder(self, loaded: CompiledModel) -> tuple[OutputDecoder, dict[int, LabelSpec]]:
        """The decoder and labels of this version: a switch may bring another layout or other labels. They are
        kept as one tuple, replaced in one assignment, as frames of the old version may still be running."""
        current = getattr(self, "_version", None)
        if current is None or current[0] is not loaded:
            current = (loaded, OutputDecoder(spec_of(loaded, DetectSpec), loaded.output_names, self.settings.decoder),
                       {label.id: label for label in loaded.spec.labels})
            self._version = current
        return current[1], current[2]

    def label_filter(self, loaded: CompiledModel) -> set[int] | None:
        """Class ids to keep (None: all)."""
        return None

    def class_aware(self) -> bool:
        return True

    def detect(self, ctx: Context, image: np.ndarray) -> list[Detection]:
        """The boxes the model finds in ``image`` (gray or BGR), in its pixels, after threshold and NMS."""
        loaded = self.loaded()
        height, width = image.shape[:2]
        decoder, labels = self._decoder(loaded)
        settings = self.settings
        fitted = self.fit(image, loaded, decoder.family_fit if settings.fit == "auto" else settings.fit)
        try:
            candidates = decoder(loaded.infer(fitted.batch))
        except ValueError as error:
            raise NodeError(f"model '{loaded.name}' version {loaded.version}: {error}") from None
        model_h, model_w = loaded.input_size
        corners = candidates.boxes.reshape(-1, 2) * np.array([model_w, model_h], np.float32)
        boxes = fitted.points_to_image(corners).reshape(-1, 4).astype(np.float32)
        boxes = np.clip(boxes, 0, np.array([width, height, width, height], np.float32))
        points = None
        if candidates.keypoints is not None and candidates.keypoints.shape[1]:
            # Not clipped: an ear or an eye may lie outside the image when the face is cut by its edge.
            keypoints = candidates.keypoints.reshape(-1, 2) * np.array([model_w, model_h], np.float32)
            points = fitted.points_to_image(keypoints).astype(np.float32).reshape(len(candidates.keypoints), -1)
        usable = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(candidates.scores)
        wanted = self.label_filter(loaded)
        if wanted is not None:
            usable &= np.isin(candidates.class_ids, list(wanted))
        configured = settings.confidence if settings.confidence is not None else loaded.spec.threshold
        confidence = float(requested(ctx, settings, "threshold", requested(
            ctx, settings, "min_confidence", 0.5 if configured is None else configured)))
        kept, scores, class_ids, kept_points = select(
            boxes[usable], candidates.scores[usable], candidates.class_ids[usable], confidence=confidence,
            iou=settings.iou or decoder.family_iou, limit=int(requested(ctx, settings, "max_labels",
                                                                        settings.max_labels)),
            weighted=decoder.family_weighted if settings.nms == "auto" else settings.nms == "weighted",
            class_aware=self.class_aware(), extras=None if points is None else points[usable])
        self.record(ctx, loaded)
        pairs: list[tuple[tuple[float, float], ...]] = (
            [()] * len(kept) if kept_points is None
            else [tuple((float(x), float(y)) for x, y in row.reshape(-1, 2)) for row in kept_points])
        return [Detection(float(x0), float(y0), float(x1), float(y1), float(score),
                          labels.get(int(class_id)) or self.label(loaded, int(class_id)),
                          keypoints)
                for (x0, y0, x1, y1), score, class_id, keypoints in zip(kept, scores, class_ids, pairs, strict=True)]


class Detect(DetectionNode[DetectSettings]):
    takes_gray = True
    settings_model = DetectSettings

    @classmethod
    def check_labels(cls, settings: DetectSettings, spec: DetectSpec) -> Problems:
        known = {label.name for label in spec.labels}
        return [(("labels", index), f"model '{settings.model}' has no label '{name}'"
                                    f"{' (labels: ' + ', '.join(sorted(known)) + ')' if known else ''}")
                for index, name in enumerate(settings.labels or []) if name not in known]

    def label_filter(self, loaded: CompiledModel) -> set[int] | None:
        if self.settings.labels is None:
            return None
        return {label.id for label in loaded.spec.labels if label.name in self.settings.labels}

    def class_aware(self) -> bool:
        return not self.settings.class_agnostic

    def run(self, ctx: Context) -> None:
        for found in self.detect(ctx, ctx["image"]):
            ctx.add_rectangle(self.id, found.x0, found.y0, found.x1 - found.x0, found.y1 - found.y0,
                              label=label_name(found.label, ctx), confidence=found.score, source_type="DETECTION",
                              color=found.label.color, class_id=found.label.id)
