"""ocr@1: read the text lines of the image (or the ROI before it) with a text detector and a recogniser.

The detector (PP-OCRv4 DB) gives a text-probability map; each connected region above `text_threshold`
becomes a rotated box, kept when its mean probability reaches `threshold`, then grown by `unclip_ratio`
(DB trains on shrunk text kernels). Each box is cut out upright with a perspective warp and `crop_margin` of
background above and below, optionally turned by 180 degrees when the angle classifier says it is upside
down, and read by the recogniser (CTC, greedy decoding, spaces the model nearly wrote restored) with the
alphabet stored in the recogniser's network. Lines under `min_confidence` are dropped.

Shapes: `dynamic` compiles the detector for any image size and the recogniser for any batch and width (CPU,
GPU); `static` (an NPU) letterboxes the image into a det_limit square and reads each line alone at rec_width.

Out: rectangles labelled with their text (source type OCR), `ocr` (text, confidence, the rotated box in frame
pixels, per line, in reading order), `text` (the lines top to bottom; boxes on one row joined by a space),
and with `expected` (a regular expression) `ocr_match`, and an NG result when it does not match.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from appliance.config.profile import reshape_refused
from appliance.context import Context
from appliance.nodes.base import NodeEnvironment, NodeError, requested
from appliance.nodes.model import ModelNode, bgr_or_grey
from appliance.nodes.settings import MAX_REC_WIDTH, OcrSettings
from appliance.runtime.compiled import CompiledModel, InputShape
from appliance.runtime.models import ModelSlot
from appliance.runtime.openvino import network_info
from appliance.runtime.spec import OcrSpec, read_spec
from appliance.runtime.store import StoreError, network_file, resolve_version

REC_HEIGHT = 48  # the PP-OCR recogniser and angle classifier are trained on lines 48 px high
CLS_WIDTH = 192
REC_BATCH = 6  # lines per recogniser call: sorted by width, so little padding is computed
MAX_CANDIDATES = 1000  # regions of the probability map looked at, as a bound on the time per frame
MIN_SIDE = 3.0  # detector pixels: thinner regions are noise, not text
# Pixel value 128 is 0 after the recogniser's (x/255 - 0.5)/0.5: the padding the models were run with.
PAD_GREY = 128
SPACE_GAP = 1.2  # see ctc_greedy


# ---------------------------------------------------------------------------------------------------------
# Alphabet and CTC


def read_alphabet(version_dir: Path) -> list[str]:
    """The recogniser's CTC labels: blank, the characters stored with the network, then the space.

    PaddleOCR exports keep the dictionary in the ONNX `metadata_props` (key `character`, one per line), which
    OpenVINO exposes as rt_info `framework/character`; a network without it may carry `alphabet.txt`.
    """
    path = network_file(version_dir)
    text = network_info(version_dir, "framework", "character")
    if text is None and (version_dir / "alphabet.txt").is_file():
        text = (version_dir / "alphabet.txt").read_text(encoding="utf-8").rstrip("\n")
    if not text:
        raise StoreError(f"{path}: no alphabet (ONNX metadata 'character' or alphabet.txt beside it)")
    # One character per line; only the line breaks separate them (a character may be a space-like symbol).
    return ["<blank>", *text.split("\n"), " "]


def ctc_greedy(probabilities: np.ndarray, labels: list[str], space_threshold: float = 1.0) -> tuple[str, float]:
    """Best path decoding of one line (T x classes): the best class per step, repeats merged, blanks (0)
    dropped. Confidence: the mean probability of the characters kept (0 when none is).

    The Chinese-trained recogniser often lets blank win over the space class (the last label) between two
    words. A space is read there when the space class reaches `space_threshold` somewhere between the two
    characters and their distance is at least SPACE_GAP times the line's median one. Tuned on 324 rendered
    labels (bench/ocr_accuracy.py's conditions with other seeds, crop_margin 0.25): the recogniser wrote 968
    of 1000 spaces itself; of the 32 it lost, 0.2 and 1.2 restored 28 and added none in about 9600 gaps within
    words, where the space class reached at most 0.11 (beside hyphens: 0.03 added 4 spaces there).
    """
    best = probabilities.argmax(axis=1)
    keep = best != 0
    keep[1:] &= best[1:] != best[:-1]
    steps = np.flatnonzero(keep)
    if steps.size == 0:
        return "", 0.0
    indices = best[steps]
    scores = probabilities[steps, indices]
    chars = [labels[i] for i in indices]
    space = len(labels) - 1
    if space_threshold < 1 and steps.size >= 3:
        usual = float(np.median(np.diff(steps)))
        spaced = [chars[0]]
        for k in range(1, len(chars)):
            left, right = steps[k - 1], steps[k]
            if (indices[k - 1] != space and indices[k] != space and right - left >= SPACE_GAP * usual
                    and probabilities[left + 1:right, space].max(initial=0) >= space_threshold):
                spaced.append(" ")
            spaced.append(chars[k])
        chars = spaced
    return "".join(chars), float(scores.mean())


# ---------------------------------------------------------------------------------------------------------
# Detection


def detector_input(image: np.ndarray, limit: int, static: bool) -> tuple[np.ndarray, float, float, int, int]:
    """The image scaled so that its longer side is `limit` (sides multiples of 32, as the DB net's strides
    need), or letterboxed into a limit x limit square. Returns (input, x scale, y scale from detector to image
    pixels, used width, used height)."""
    height, width = image.shape[:2]
    side = max(32, limit // 32 * 32)
    scale = side / max(height, width)
    if static:
        used_w, used_h = max(1, round(width * scale)), max(1, round(height * scale))
    else:
        used_w, used_h = max(32, round(width * scale / 32) * 32), max(32, round(height * scale / 32) * 32)
    shrinking = used_w * used_h < width * height
    resized = cv2.resize(image, (used_w, used_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    if static:
        # The image's mean colour: a flat margin the detector finds no text in, and no hard edge at the border.
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = np.asarray(cv2.mean(resized)[:3]).round().astype(np.uint8)
        canvas[:used_h, :used_w] = resized
        resized = canvas
    return resized, width / used_w, height / used_h, used_w, used_h


def _rect_corners(rect: tuple[Any, ...]) -> np.ndarray:
    """The 4 corners of a rotated rectangle, clockwise from the top-left (image y points down)."""
    points = cv2.boxPoints(rect)
    by_x = points[np.argsort(points[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    top_left, bottom_left = left[np.argsort(left[:, 1])]
    top_right, bottom_right = right[np.argsort(right[:, 1])]
    return np.array([top_left, top_right, bottom_right, bottom_left], np.float32)


def db_boxes(probability: np.ndarray, text_threshold: float, box_threshold: float,
             unclip_ratio: float) -> list[tuple[np.ndarray, float]]:
    """Text boxes of a DB probability map: (4 corners in map pixels, clockwise from top-left; score)."""
    bitmap = (probability > text_threshold).astype(np.uint8)
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    boxes = []
    map_h, map_w = probability.shape
    for contour in contours[:MAX_CANDIDATES]:
        (cx, cy), (w, h), angle = cv2.minAreaRect(contour)
        if min(w, h) < MIN_SIDE:
            continue
        # Score: the mean probability inside the region itself (not its box, which may hold a neighbour).
        x, y, bw, bh = cv2.boundingRect(contour)
        mask = np.zeros((bh, bw), np.uint8)
        cv2.fillPoly(mask, [(contour.reshape(-1, 2) - (x, y)).astype(np.int32)], 1)
        score = float(cv2.mean(probability[y:y + bh, x:x + bw], mask)[0])
        if score < box_threshold:
            continue
        # DB learnt shrunk kernels: grow the box back by area * ratio / perimeter on every side. For a
        # rectangle this is exactly the rotated rectangle of the offset polygon (what pyclipper would give).
        grow = w * h * unclip_ratio / (2 * (w + h))
        w, h = w + 2 * grow, h + 2 * grow
        if min(w, h) < MIN_SIDE + 2:
            continue
        corners = _rect_corners(((cx, cy), (w, h), angle))
        corners[:, 0] = corners[:, 0].clip(0, map_w)
        corners[:, 1] = corners[:, 1].clip(0, map_h)
        boxes.append((corners, score))
    return boxes


def crop_line(image: np.ndarray, corners: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """The quadrilateral (image pixels, clockwise from top-left) warped to an upright rectangle, with `margin`
    times the line's height (the box's short side) added above and below it (left and right of a tall box)."""
    along, down = corners[1] - corners[0], corners[3] - corners[0]
    if margin:
        # DB's boxes hug the glyphs; the recogniser reads better with background around them (on rendered
        # labels, bench/ocr_accuracy.py with other seeds, 0.25 took exact lines from 87 % to 98.5 %).
        if np.linalg.norm(along) >= np.linalg.norm(down):
            corners = corners + np.array([-1, -1, 1, 1], np.float32)[:, None] * (down * margin)
        else:
            corners = corners + np.array([-1, 1, 1, -1], np.float32)[:, None] * (along * margin)
    width = max(2, round(max(np.linalg.norm(corners[0] - corners[1]), np.linalg.norm(corners[3] - corners[2]))))
    height = max(2, round(max(np.linalg.norm(corners[0] - corners[3]), np.linalg.norm(corners[1] - corners[2]))))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    # Corners are on pixel edges; OpenCV's warp samples at pixel centres.
    matrix = cv2.getPerspectiveTransform((corners - 0.5).astype(np.float32), target)
    line = cv2.warpPerspective(image, matrix, (width, height), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REPLICATE)
    if height >= 1.5 * width:
        # A tall box is a vertical line (or one character): read it turned, as the models were trained.
        line = cv2.rotate(line, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return line


def _fit_height(line: np.ndarray, width_limit: int) -> np.ndarray:
    """The line scaled to REC_HEIGHT at its aspect ratio, no wider than width_limit."""
    height, width = line.shape[:2]
    target = max(1, min(width_limit, math.ceil(REC_HEIGHT * width / height)))
    return cv2.resize(line, (target, REC_HEIGHT), interpolation=cv2.INTER_LINEAR)


def _padded_batch(lines: list[np.ndarray], width: int) -> np.ndarray:
    batch = np.full((len(lines), REC_HEIGHT, width, 3), PAD_GREY, np.uint8)
    for index, line in enumerate(lines):
        batch[index, :, :line.shape[1]] = line[:, :width]
    return batch


def reading_order(boxes: list[np.ndarray]) -> list[list[int]]:
    """Indices of the boxes as rows, top to bottom, each left to right, along the text's own direction (the
    median slope of the boxes' top edges), so that the lines of a tilted label stay apart. A box joins a row
    when its centre lies within half the smaller height of the row's first box."""
    if not boxes:
        return []
    slopes = [math.atan2(b[1, 1] - b[0, 1], b[1, 0] - b[0, 0]) for b in boxes]
    angle = float(np.median(slopes))
    # Rotate by -angle: the text runs along x.
    turn = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    spans = []
    for box in boxes:
        upright = box @ turn.T
        spans.append((float(upright[:, 1].min()), float(upright[:, 1].max()), float(upright[:, 0].min())))
    rows: list[list[int]] = []
    for index in sorted(range(len(boxes)), key=lambda i: (spans[i][0] + spans[i][1]) / 2):
        top, bottom, _ = spans[index]
        centre, height = (top + bottom) / 2, bottom - top
        if rows:
            first_top, first_bottom, _ = spans[rows[-1][0]]
            first_centre = (first_top + first_bottom) / 2
            if abs(centre - first_centre) < 0.5 * min(height, first_bottom - first_top):
                rows[-1].append(index)
                continue
        rows.append([index])
    return [sorted(row, key=lambda i: spans[i][2]) for row in rows]


def text_matches(pattern: re.Pattern[str], text: str) -> bool:
    """Whether some row of the text, or the whole text (rows joined by newlines), matches in full."""
    return any(pattern.fullmatch(row) for row in text.split("\n")) or pattern.fullmatch(text) is not None


# ---------------------------------------------------------------------------------------------------------
# The node


ROLES = {"det_model": "detector", "rec_model": "recogniser", "cls_model": "angle classifier"}


class Ocr(ModelNode[OcrSettings]):
    takes_gray = True
    settings_model = OcrSettings

    @classmethod
    def check(cls, settings: OcrSettings, env: NodeEnvironment) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if settings.expected is not None:
            try:
                re.compile(settings.expected)
            except re.error as error:
                problems.append((("expected",), f"not a regular expression: {error}"))
        refused = reshape_refused(env.config.firmware_profile)
        if refused is not None:
            problems.append((("type",), refused))
        store = env.project_dir / env.config.models_dir
        for field, role in ROLES.items():
            if field == "cls_model" and not settings.angle_classifier:
                continue
            name = getattr(settings, field)
            try:
                spec = read_spec(resolve_version(store, name))
            except StoreError as error:
                problems.append(((field,), f"{error}; put a version in {store / name}/<version>/ (network, "
                                           "spec.yaml, manifest.json) and name it in its `current` file "
                                           "(`make models` installs ocr_det, ocr_rec and ocr_cls)"))
                continue
            if not isinstance(spec, OcrSpec) or spec.outputs.role != role:
                what = f"an OCR {spec.outputs.role}" if isinstance(spec, OcrSpec) else f"a {spec.task} model"
                problems.append(((field,), f"model '{name}' is {what}, not an OCR {role}"))
        return problems

    def _static(self) -> bool:
        if self.settings.shapes != "auto":
            return self.settings.shapes == "static"
        assert self.env.runtime is not None
        return self.env.runtime.options.static_shapes  # the firmware profile's (the NPU's)

    def prepare(self) -> None:
        s = self.settings
        static = self._static()
        side = max(32, s.det_limit // 32 * 32)
        shapes: dict[str, InputShape] = {
            "det": (1, side, side) if static else (1, -1, -1),
            "rec": (1, REC_HEIGHT, s.rec_width) if static else (-1, REC_HEIGHT, -1),
            "cls": (1, REC_HEIGHT, CLS_WIDTH) if static else (-1, REC_HEIGHT, CLS_WIDTH),
        }
        names = {"det": s.det_model, "rec": s.rec_model, "cls": s.cls_model}
        self.static = static
        self.slots: dict[str, ModelSlot] = {
            role: self.model_slot(names[role], shapes[role])
            for role in (("det", "rec", "cls") if s.angle_classifier else ("det", "rec"))}
        self._alphabet_lock = threading.Lock()
        self._alphabet: tuple[CompiledModel | None, list[str]] = (None, [])
        self._labels(self.slots["rec"].current)  # a recogniser without its alphabet stops the start
        self.pattern = re.compile(s.expected) if s.expected is not None else None

    def _labels(self, rec: CompiledModel | None) -> list[str]:
        """The CTC labels of this recogniser version (read again after a version switch)."""
        assert rec is not None
        loaded, labels = self._alphabet
        if loaded is rec:
            return labels
        with self._alphabet_lock:
            if self._alphabet[0] is not rec:
                labels = read_alphabet(resolve_version(self.slots["rec"].store, rec.name, rec.version))
                classes = rec.outputs[0].shape[-1] if rec.outputs and rec.outputs[0].shape else -1
                if classes > 0 and classes != len(labels):
                    raise StoreError(f"model '{rec.name}' version {rec.version}: {classes} classes "
                                     f"but an alphabet of {len(labels)} labels (with blank and space)")
                self._alphabet = (rec, labels)
            return self._alphabet[1]

    def _recognise(self, rec: CompiledModel, lines: list[np.ndarray], labels: list[str]) -> list[tuple[str, float]]:
        width_limit = self.settings.rec_width if self.static else MAX_REC_WIDTH
        fitted = [_fit_height(line, width_limit) for line in lines]
        results: list[tuple[str, float]] = [("", 0.0)] * len(lines)
        order = sorted(range(len(lines)), key=lambda i: fitted[i].shape[1])
        step = 1 if self.static else REC_BATCH
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            width = self.settings.rec_width
            if not self.static:
                width = max(width, *(fitted[i].shape[1] for i in chunk))
            output = rec.infer(_padded_batch([fitted[i] for i in chunk], width))
            probabilities = np.asarray(output[rec.output_names[0]], np.float32)
            for row, index in enumerate(chunk):
                results[index] = ctc_greedy(probabilities[row], labels, self.settings.space_threshold)
        return results

    def _upright(self, cls: CompiledModel, lines: list[np.ndarray]) -> list[bool]:
        """Which lines the classifier finds upside down (probability of 180 degrees over cls_threshold)."""
        fitted = [_fit_height(line, CLS_WIDTH) for line in lines]
        flipped: list[bool] = []
        step = 1 if self.static else REC_BATCH
        for start in range(0, len(fitted), step):
            output = cls.infer(_padded_batch(fitted[start:start + step], CLS_WIDTH))
            probabilities = np.asarray(output[cls.output_names[0]], np.float32).reshape(-1, 2)
            flipped += [bool(p[1] > self.settings.cls_threshold) for p in probabilities]
        return flipped

    def run(self, ctx: Context) -> None:
        s = self.settings
        det, rec = self.loaded(self.slots["det"]), self.loaded(self.slots["rec"])
        cls = self.loaded(self.slots["cls"]) if "cls" in self.slots else None
        labels = self._labels(rec)
        image = bgr_or_grey(ctx["image"], 1, det.name)
        height, width = image.shape[:2]
        if height < 8 or width < 8:
            raise NodeError(f"image {width}x{height} is too small to read text in")
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)  # lines are cut from it in colour
        batch, sx, sy, used_w, used_h = detector_input(image, s.det_limit, self.static)
        output = det.infer(batch[None])
        probability = np.asarray(output[det.output_names[0]], np.float32).reshape(batch.shape[:2])
        box_threshold = float(requested(ctx, s, "threshold", s.threshold))
        found = db_boxes(probability[:used_h, :used_w], s.text_threshold, box_threshold, s.unclip_ratio)
        # Detector pixels -> the node's image: corners are pixel centres of the map, scaled to pixel edges.
        boxes = [((corners + 0.5) * (sx, sy)).clip(0, (width, height)) for corners, _ in found]
        lines = [crop_line(image, box, s.crop_margin) for box in boxes]
        self.record(ctx, *(m for m in (det, rec, cls) if m is not None))
        if cls is not None and lines:
            lines = [cv2.rotate(line, cv2.ROTATE_180) if turn else line
                     for line, turn in zip(lines, self._upright(cls, lines), strict=True)]
        read = self._recognise(rec, lines, labels) if lines else []
        min_confidence = float(requested(ctx, s, "min_confidence", s.min_confidence))
        limit = int(requested(ctx, s, "max_labels", s.max_labels))
        kept = [i for i, (text, confidence) in enumerate(read) if text.strip() and confidence >= min_confidence]
        kept = sorted(kept, key=lambda i: -read[i][1])[:limit]
        rows = reading_order([boxes[i] for i in kept])
        entries = ctx.setdefault("ocr", [])
        row_texts = []
        for row in rows:
            texts = []
            for position in row:
                index = kept[position]
                text, confidence = read[index]
                text = " ".join(text.split())  # one space between words, none at the ends
                texts.append(text)
                box = boxes[index]
                corners = np.c_[box, np.ones(4)] @ ctx.to_frame.T
                corners = corners[:, :2] / corners[:, 2:3]
                entries.append({"node": self.id, "text": text, "confidence": round(confidence, 4),
                                "box": [[round(float(x), 1), round(float(y), 1)] for x, y in corners]})
                left, top = box.min(axis=0)
                right, bottom = box.max(axis=0)
                ctx.add_rectangle(self.id, float(left), float(top), float(right - left), float(bottom - top),
                                  label=text, confidence=confidence, source_type="OCR", color=s.color)
            row_texts.append(" ".join(texts))
        ctx["text"] = "\n".join(row_texts)
        if self.pattern is not None:
            matched = text_matches(self.pattern, ctx["text"])
            ctx["ocr_match"] = matched
            if not matched:
                # NG even without an evaluate@1; an evaluate@1 after this node decides alone (key_equals).
                ctx["result"] = False
