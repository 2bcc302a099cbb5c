"""detect@1 through a real server: one model per output layout, built here with known outputs, so every box is
known exactly; then the real BlazeFace models of the shared store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest
import requests
import yaml
from openvino import opset13 as ops
from skimage import data

from appliance.runtime.store import StoreError, switch_current, write_manifest
from tests.conftest import REPO, Server, start_server, write_project

SIZE = 100  # model input side, pixels
# 600 = 6 x 100 and 480 = 6 x 80: the frame shrinks to the input (or its letterbox) by whole factors.
FRAME_W, FRAME_H = 600, 480
DEFECTS = [{"id": 1, "name": "scratch", "color": "#ff0000", "names": {"de": "Kratzer", "cs": "škrábanec"}},
           {"id": 2, "name": "dent", "color": "#0000ff", "names": {"de": "Delle"}}]
PARTS = [{"id": 0, "name": "bolt", "color": "#00ff00"}, {"id": 1, "name": "nut"}, {"id": 2, "name": "washer"}]


def save_constant_model(store: Path, name: str, outputs: dict[str, np.ndarray], spec_outputs: dict | None,
                        labels: list[dict], *, size: int = SIZE, score_mask: dict[str, np.ndarray] | None = None,
                        threshold: float | None = None) -> None:
    """A u8 NHWC BGR model whose outputs are the given arrays; where ``score_mask`` is 1 the value is also
    multiplied by the frame's brightest pixel / 255, so a black frame has no confident box."""
    image = ops.parameter([1, size, size, 3], ov.Type.u8, name="image")
    brightest = ops.divide(ops.reduce_max(ops.convert(image, ov.Type.f32), ops.constant(np.array([0, 1, 2, 3])),
                                          keep_dims=False), ops.constant(np.float32(255)))
    results = []
    for output_name, values in outputs.items():
        mask = (score_mask or {}).get(output_name, np.zeros_like(values))
        # values * (1 + mask * (brightest - 1)): the values themselves for a frame with a white pixel.
        factor = ops.add(ops.multiply(ops.constant(mask.astype(np.float32)),
                                      ops.subtract(brightest, ops.constant(np.float32(1)))),
                         ops.constant(np.float32(1)))
        node = ops.multiply(ops.constant(values.astype(np.float32)), factor)
        node.output(0).set_names({output_name})
        results.append(node)
    version_dir = store / name / "1"
    version_dir.mkdir(parents=True)
    # Full precision: FP16 weights (save_model's default) would move the known scores and boxes.
    ov.save_model(ov.Model(results, [image], name), version_dir / "model.xml", compress_to_fp16=False)
    spec = {"task": "detect", "boxes": True, "exclusive": False, "input": {"size": [size, size]},
            "outputs": spec_outputs, "labels": labels}
    if threshold is not None:
        spec["threshold"] = threshold
    (version_dir / "spec.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    write_manifest(version_dir)
    switch_current(store / name, "1")


# SSD rows: image_id, label, confidence, x0, y0, x1, y1 (fractions of the input).
SSD_ROWS = np.array([
    [0, 1, 0.9, 0.10, 0.20, 0.40, 0.60],   # scratch
    [0, 1, 0.8, 0.12, 0.22, 0.42, 0.62],   # another scratch over it: suppressed
    [0, 2, 0.7, 0.11, 0.21, 0.41, 0.61],   # a dent over it: another class, kept
    [0, 2, 0.3, 0.60, 0.60, 0.90, 0.90],   # a weak dent
    [-1, 0, 0, 0, 0, 0, 0],                # end of the detections
    [0, 1, 0.99, 0.50, 0.50, 0.60, 0.60],  # padding after the end: never a box
], np.float32)[None, None]

# YOLO columns: cx, cy, w, h (input pixels), then one score per class (bolt, nut).
YOLO_COLUMNS = np.array([
    [50, 50, 20, 40, 0.90, 0.10],  # bolt
    [52, 50, 20, 40, 0.85, 0.20],  # bolt over it: suppressed
    [20, 80, 10, 10, 0.10, 0.60],  # nut
], np.float32)

# BlazeFace-like: a 32x32 input, strides [8, 16, 16]: a 4x4 grid with 2 anchors per cell (indices 0-31), then
# the two stride-16 layers merged into a 2x2 grid with 4 anchors per cell (indices 32-47).
BLAZE_SIZE = 32


def blaze_outputs() -> tuple[np.ndarray, np.ndarray]:
    regressors = np.zeros((1, 48, 16), np.float32)
    logits = np.full((1, 48, 1), -10, np.float32)
    # Cell row 1, column 2 of the 4x4 grid (centre 0.625, 0.375): anchors 12 and 13, the same face twice.
    regressors[0, 12, :4] = [3.2, -1.6, 16, 8]   # centre +0.1, -0.05; size 0.5 x 0.25
    logits[0, 12] = 2.0
    regressors[0, 13, :4] = [3.52, -1.6, 16, 8]  # 0.01 further right
    logits[0, 13] = 1.0
    # Last anchor of cell row 1, column 0 of the 2x2 grid (centre 0.25, 0.75): size 0.2.
    regressors[0, 43, :4] = [0, 0, 6.4, 6.4]
    logits[0, 43] = 3.0
    return regressors, logits


def save_models(store: Path) -> None:
    mask = np.zeros_like(SSD_ROWS)
    mask[..., 2] = 1
    save_constant_model(store, "ssd", {"detection_out": SSD_ROWS}, {"decoder": "ssd", "output": "detection_out"},
                        DEFECTS, score_mask={"detection_out": mask}, threshold=0.5)
    save_constant_model(store, "yolo", {"output0": YOLO_COLUMNS.T[None]}, {"decoder": "yolo"}, PARTS)
    save_constant_model(store, "yolo_t", {"output0": YOLO_COLUMNS[None]}, {"decoder": "yolo_transposed"}, PARTS)
    # TensorFlow's layout: y0, x0, y1, x1 normalised, class ids as floats, padded with zero scores.
    save_constant_model(store, "tf", {
        "detection_boxes": np.array([[[0.25, 0.5, 0.75, 1.0], [0, 0, 0.1, 0.1]]], np.float32),
        "detection_scores": np.array([[0.95, 0.0]], np.float32),
        "detection_classes": np.array([[2, 1]], np.float32)},
        {"decoder": "separate", "boxes": "detection_boxes", "scores": "detection_scores",
         "labels": "detection_classes", "box_format": "yxyx"}, DEFECTS)
    # Per-class scores and centre boxes in input pixels: the best class of each box wins.
    save_constant_model(store, "per_class", {
        "boxes": np.array([[[50, 50, 100, 100], [10, 10, 4, 4]]], np.float32),
        "scores": np.array([[[0.1, 0.2, 0.7], [0.3, 0.2, 0.1]]], np.float32)},
        {"decoder": "separate", "box_format": "cxcywh", "normalized": False}, PARTS)
    regressors, logits = blaze_outputs()
    save_constant_model(store, "blaze", {"regressors": regressors, "classificators": logits},
                        {"decoder": "blazeface", "boxes": "regressors", "scores": "classificators",
                         "anchors": {"strides": [8, 16, 16], "offset": 0.5}},
                        [{"id": 0, "name": "face", "color": "#00ff00"}], size=BLAZE_SIZE, threshold=0.5)


FLOW = {"nodes": {
    "ssd": {"type": "detect@1", "model": "ssd", "overrides": ["threshold", "max_labels"]},
    "roi": {"type": "crop@1", "x": 100, "y": 50, "width": 400, "height": 300, "next": ["half"]},
    "half": {"type": "resize@1", "scale": 0.5, "next": ["ssd_roi"]},
    "ssd_roi": {"type": "detect@1", "model": "ssd"},
    "scratches": {"type": "detect@1", "model": "ssd", "labels": ["scratch"], "confidence": 0.2},
    "agnostic": {"type": "detect@1", "model": "ssd", "class_agnostic": True},
    "yolo": {"type": "detect@1", "model": "yolo", "max_labels": 5},
    "yolo_t": {"type": "detect@1", "model": "yolo_t", "fit": "stretch"},
    "tf": {"type": "detect@1", "model": "tf"},
    "per_class": {"type": "detect@1", "model": "per_class"},
    "blaze": {"type": "detect@1", "model": "blaze"},
    "blaze_hard": {"type": "detect@1", "model": "blaze", "nms": "hard"},
}}


@pytest.fixture(scope="module")
def detectors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = write_project(tmp_path_factory.mktemp("detect") / "p", FLOW)
    save_models(project / "models")
    server = start_server(project)
    yield server
    server.stop()


def white_frame(width: int = FRAME_W, height: int = FRAME_H) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), 255, np.uint8))[1].tobytes()


def analyze(server: Server, body: bytes, query: str = "") -> dict:
    response = requests.post(f"{server.url}/analyze_image{query}", data=body)
    assert response.status_code == 200, response.text
    ctx = response.json()
    assert ctx["errors"] == [], ctx["errors"]
    return ctx


def boxes_of(ctx: dict, node: str) -> list[tuple]:
    """(label, x, y, width, height, confidence) of one node's rectangles, in answer order."""
    return [(r["classNames"][0]["label"], r["x"], r["y"], r["width"], r["height"], round(r["confidence"], 4))
            for r in ctx["detectedRectangles"] if r["source"]["moduleId"] == node]


def assert_boxes(found: list[tuple], expected: list[tuple]) -> None:
    """Labels and confidences exactly; boxes, given as (label, x0, y0, x1, y1, confidence) in frame pixels,
    within the pixel that rounding the edges outwards may add."""
    assert [(box[0], box[5]) for box in found] == [(box[0], round(box[5], 4)) for box in expected]
    for box, (_, x0, y0, x1, y1, _) in zip(found, expected, strict=True):
        assert np.allclose(box[1:5], (x0, y0, x1 - x0, y1 - y0), atol=1.01), (box, (x0, y0, x1, y1))


def test_ssd_rows_become_rectangles_with_class_aware_nms(detectors: Server) -> None:
    ctx = analyze(detectors, white_frame())
    # Stretched to the input: x fractions times 600, y fractions times 480.
    assert_boxes(boxes_of(ctx, "ssd"), [("scratch", 60, 96, 240, 288, 0.9), ("dent", 66, 100.8, 246, 292.8, 0.7)])
    scratch = next(r for r in ctx["detectedRectangles"] if r["source"]["moduleId"] == "ssd")
    assert scratch["classNames"] == [{"id": 1, "label": "scratch", "confidence": 90, "color": "#ff0000"}]
    assert scratch["source"]["type"] == "DETECTION"
    assert {"node": "ssd", "model": "ssd", "version": "1", "device": "CPU"} in ctx["models"]


def test_boxes_go_back_through_crop_and_resize_to_frame_pixels(detectors: Server) -> None:
    ctx = analyze(detectors, white_frame())
    # The ROI (100, 50, 400 x 300) is halved to 200 x 150; the scratch is at 0.1-0.4 x 0.2-0.6 of it.
    assert_boxes(boxes_of(ctx, "ssd_roi"), [("scratch", 100 + 0.1 * 400, 50 + 0.2 * 300, 100 + 0.4 * 400,
                                             50 + 0.6 * 300, 0.9),
                                            ("dent", 100 + 0.11 * 400, 50 + 0.21 * 300, 100 + 0.41 * 400,
                                             50 + 0.61 * 300, 0.7)])


def test_labels_filter_and_class_agnostic_nms(detectors: Server) -> None:
    ctx = analyze(detectors, white_frame())
    # Only scratches, at confidence 0.2: the second scratch still falls to NMS.
    assert [box[0] for box in boxes_of(ctx, "scratches")] == ["scratch"]
    # Across classes the dent is suppressed by the scratch; the weak dent stays under 0.5.
    assert [box[0] for box in boxes_of(ctx, "agnostic")] == ["scratch"]


def test_a_black_frame_has_no_confident_box(detectors: Server) -> None:
    ctx = analyze(detectors, cv2.imencode(".png", np.zeros((FRAME_H, FRAME_W, 3), np.uint8))[1].tobytes())
    assert boxes_of(ctx, "ssd") == [] and boxes_of(ctx, "ssd_roi") == []


def test_yolo_layout_letterboxed(detectors: Server) -> None:
    ctx = analyze(detectors, white_frame())
    # 600 x 480 -> 100 x 80 inside the 100 x 100 input, 10 rows of border on top: frame = (model - pad) * 6.
    assert_boxes(boxes_of(ctx, "yolo"), [("bolt", 40 * 6, 20 * 6, 60 * 6, 60 * 6, 0.9),
                                         ("nut", 15 * 6, 65 * 6, 25 * 6, 75 * 6, 0.6)])


def test_yolo_transposed_layout_stretched(detectors: Server) -> None:
    ctx = analyze(detectors, white_frame())
    assert_boxes(boxes_of(ctx, "yolo_t"), [("bolt", 40 * 6, 30 * 4.8, 60 * 6, 70 * 4.8, 0.9),
                                           ("nut", 15 * 6, 75 * 4.8, 25 * 6, 85 * 4.8, 0.6)])


def test_a_stretched_frame_goes_to_the_graph_whole_and_maps_back_at_its_own_factor(detectors: Server) -> None:
    # 640 is 6.4 x 100: OpenVINO resizes the whole frame inside the graph (runtime/openvino.py), so every column
    # is seen and 6.4 frame pixels make one input pixel (OpenCV's area resize used to drop the last 4 columns).
    ctx = analyze(detectors, white_frame(640, 480))
    assert_boxes(boxes_of(ctx, "yolo_t"), [("bolt", 40 * 6.4, 30 * 4.8, 60 * 6.4, 70 * 4.8, 0.9),
                                           ("nut", 15 * 6.4, 75 * 4.8, 25 * 6.4, 85 * 4.8, 0.6)])


def test_separate_outputs_tensorflow_style_and_per_class_scores(detectors: Server) -> None:
    ctx = analyze(detectors, white_frame())
    assert_boxes(boxes_of(ctx, "tf"), [("dent", 300, 120, 600, 360, 0.95)])
    # cx 50, cy 50, 100 x 100 pixels: the whole input; its best class is 2 (washer) at 0.7; the other box's
    # best score, 0.3, is under the default 0.5.
    assert_boxes(boxes_of(ctx, "per_class"), [("washer", 0, 0, 600, 480, 0.7)])


def test_blazeface_anchors_and_weighted_nms(detectors: Server) -> None:
    ctx = analyze(detectors, white_frame(640, 480))
    # 640 x 480 letterboxed into 32 x 32: 32 x 24 with 4 rows of border on top; 20 frame pixels per input pixel.
    def to_frame(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return x0 * 32 * 20, (y0 * 32 - 4) * 20, x1 * 32 * 20, (y1 * 32 - 4) * 20

    first, second, small = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-3.0))
    face = np.array([0.475, 0.2, 0.975, 0.45])
    merged = (first * face + second * (face + [0.01, 0, 0.01, 0])) / (first + second)
    small_face = ("face", *to_frame(0.15, 0.65, 0.35, 0.85), small)
    assert_boxes(boxes_of(ctx, "blaze"), [small_face, ("face", *to_frame(*merged), first)])
    assert_boxes(boxes_of(ctx, "blaze_hard"), [small_face, ("face", *to_frame(*face), first)])
    # The merged box moved by the second face's weight: 0.01 x 0.45 of the input, 2.9 frame pixels.
    assert boxes_of(ctx, "blaze")[1][1] - boxes_of(ctx, "blaze_hard")[1][1] in (2, 3)


def test_max_labels_and_threshold_from_the_request_where_the_node_allows_them(detectors: Server) -> None:
    assert [box[0] for box in boxes_of(analyze(detectors, white_frame(), "?max_labels=1"), "ssd")] == ["scratch"]
    ctx = analyze(detectors, white_frame(), "?threshold=0.2")
    assert [(box[0], box[5]) for box in boxes_of(ctx, "ssd")] == [("scratch", 0.9), ("dent", 0.7), ("dent", 0.3)]
    # ssd_roi does not list `threshold` in its overrides: its own 0.5 (the spec's threshold) holds.
    assert [box[0] for box in boxes_of(ctx, "ssd_roi")] == ["scratch", "dent"]


def test_an_override_no_node_allows_is_400(detectors: Server) -> None:
    response = requests.post(f"{detectors.url}/analyze_image?min_confidence=0.2", data=white_frame())
    assert response.status_code == 400
    assert response.json() == {"status": 400, "message": "min_confidence cannot be set by a request in this "
                               "project: no node of its flow lists it in `overrides`", "data": None}


def test_lang_picks_label_names(detectors: Server) -> None:
    assert [box[0] for box in boxes_of(analyze(detectors, white_frame(), "?lang=de"), "ssd")] == ["Kratzer", "Delle"]
    assert [box[0] for box in boxes_of(analyze(detectors, white_frame(), "?lang=cs-CZ"), "ssd")] == [
        "škrábanec", "dent"]  # dent has no Czech name: the default


def test_check_refuses_unknown_labels_and_a_missing_decoder(tmp_path: Path) -> None:
    from appliance.errors import ConfigError
    from appliance.project import Project

    project = write_project(tmp_path / "p", {"nodes": {
        "a": {"type": "detect@1", "model": "ssd", "labels": ["scratch", "purple"]},
        "b": {"type": "detect@1", "model": "bare"}}})
    save_models(project / "models")
    save_constant_model(project / "models", "bare", {"out": SSD_ROWS}, None, DEFECTS)
    with pytest.raises(ConfigError) as refused:
        Project.load(project)
    message = str(refused.value)
    assert "model 'ssd' has no label 'purple' (labels: dent, scratch)" in message
    assert "model 'bare': no output decoder: set `decoder`" in message


def test_outputs_that_do_not_fit_the_decoder_stop_the_start(tmp_path: Path) -> None:
    from appliance.project import Project

    project = write_project(tmp_path / "p", {"nodes": {"a": {"type": "detect@1", "model": "ssd",
                                                             "decoder": "separate"}}})
    save_models(project / "models")
    loaded = Project.load(project)
    with pytest.raises(StoreError, match=r"detect@1 node 'a': separate decoder: no output 'boxes' "
                                         r"\(outputs: detection_out\); name it in spec.yaml as outputs.boxes"):
        loaded.prepare()


@pytest.fixture(scope="module")
def blazeface(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flow = {"nodes": {"short": {"type": "detect@1", "model": "face_short"},
                      "full": {"type": "detect@1", "model": "face_full"}}}
    folder = tmp_path_factory.mktemp("blazeface")
    project = write_project(folder / "p", flow, models_dir=str(REPO / "models"), cache_dir=str(folder / "cache"))
    server = start_server(project)
    yield server
    server.stop()


def rgb_png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_real_blazeface_finds_the_astronaut_and_no_face_in_coffee(blazeface: Server) -> None:
    ctx = analyze(blazeface, rgb_png(data.astronaut()))
    ((label, x, y, width, height, confidence),) = boxes_of(ctx, "short")
    assert label == "face" and confidence > 0.85
    # MODELS.md: short range 0.92 at (179, 82)-(271, 175), full range 0.91 at (172, 66)-(279, 173).
    assert np.allclose((x, y, x + width, y + height), (179, 82, 271, 175), atol=4)
    ((label, x, y, width, height, confidence),) = boxes_of(ctx, "full")
    assert label == "face" and confidence > 0.85
    assert np.allclose((x, y, x + width, y + height), (172, 66, 279, 173), atol=4)
    coffee = analyze(blazeface, rgb_png(data.coffee()))
    assert coffee["detectedRectangles"] == []


def test_threshold_from_a_request_is_400_when_no_node_lists_it(blazeface: Server) -> None:
    response = requests.post(f"{blazeface.url}/analyze_image?threshold=0.1", data=rgb_png(data.coffee()))
    assert response.status_code == 400
    assert response.json()["message"] == ("threshold cannot be set by a request in this project: no node of its "
                                          "flow lists it in `overrides`")
