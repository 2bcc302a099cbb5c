"""ocr@1 with the real PP-OCRv4 detector, recogniser and angle classifier of the shared store (`make models`),
on labels rendered with OpenCV's Hershey fonts, served by a real server."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from appliance.nodes.ocr import ctc_greedy, read_alphabet, reading_order, text_matches
from appliance.runtime.store import resolve_version
from tests.conftest import REPO, Server, start_server, write_project

STORE = REPO / "models"
LOT, SERIAL = "LOT 2024-A17", "SN 84731-XK9"
# The two lines' baselines in the frame, and a line outside the ROI that must not be read.
ORIGINS = ((240, 200), (240, 290))
ROI = {"x": 160, "y": 90, "width": 640, "height": 360}
FLOW = {"nodes": {
    "roi": {"type": "crop@1", **ROI, "next": ["read"]},
    "read": {"type": "ocr@1", "expected": r"LOT 2024-A1[0-9]", "overrides": ["max_labels", "min_confidence"],
             "next": ["verdict"]},
    "verdict": {"type": "evaluate@1", "rules": [{"rule": "key_equals", "key": "ocr_match", "value": True}]},
}}
FONTS = {"simplex": cv2.FONT_HERSHEY_SIMPLEX, "duplex": cv2.FONT_HERSHEY_DUPLEX,
         "complex": cv2.FONT_HERSHEY_COMPLEX, "triplex": cv2.FONT_HERSHEY_TRIPLEX}


def label(lines: tuple[str, ...] = (LOT, SERIAL), font: int = cv2.FONT_HERSHEY_SIMPLEX, scale: float = 1.3,
          thickness: int = 2, outside: bool = False) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A 960x540 frame: a white card with the lines on a grey part (and a line above the ROI with `outside`).
    Returns the frame and each line's ink box (x, y, width, height) in frame pixels, measured on the drawing
    (getTextSize's height includes room above the capitals)."""
    image = np.full((540, 960, 3), 90, np.uint8)
    cv2.rectangle(image, (200, 130), (760, 420), (245, 245, 245), -1)
    if outside:
        cv2.putText(image, "OUTSIDE 999", (20, 50), font, 1.0, (245, 245, 245), 2, cv2.LINE_AA)
    boxes = []
    for line, origin in zip(lines, ORIGINS, strict=False):
        cv2.putText(image, line, origin, font, scale, (20, 20, 20), thickness, cv2.LINE_AA)
        ink = np.zeros(image.shape[:2], np.uint8)
        cv2.putText(ink, line, origin, font, scale, 255, thickness, cv2.LINE_AA)
        boxes.append(cv2.boundingRect((ink > 100).astype(np.uint8)))
    return image, boxes


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def ocr_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = write_project(tmp_path_factory.mktemp("ocr") / "p", FLOW, models_dir=str(STORE))
    server = start_server(project)
    yield server
    server.stop()


def analyze(server: Server, image: np.ndarray, query: str = "") -> dict:
    response = requests.post(f"{server.url}/analyze_image{query}", data=png(image), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("font", FONTS)
def test_reads_a_clean_label_exactly_with_boxes_in_frame_pixels_through_the_crop(ocr_server: Server,
                                                                                   font: str) -> None:
    image, truth = label(font=FONTS[font], outside=True)
    ctx = analyze(ocr_server, image)
    assert ctx["errors"] == []
    assert ctx["text"] == f"{LOT}\n{SERIAL}"  # the white line outside the ROI is not read
    assert [entry["text"] for entry in ctx["ocr"]] == [LOT, SERIAL]
    assert ctx["ocr_match"] is True and ctx["result"] is True
    rectangles = ctx["detectedRectangles"]
    assert [r["classNames"][0]["label"] for r in rectangles] == [LOT, SERIAL]
    assert {r["source"]["type"] for r in rectangles} == {"OCR"}
    for rectangle, entry, (x, y, width, height) in zip(rectangles, ctx["ocr"], truth, strict=True):
        # DB boxes hug the ink: every edge within 6 px (under a quarter of the 27 px capitals) of where OpenCV
        # drew the text, in frame pixels (measured: 0-3 px, 5 below the heavier fonts).
        found = (rectangle["x"], rectangle["y"], rectangle["x"] + rectangle["width"],
                 rectangle["y"] + rectangle["height"])
        assert np.allclose(found, (x, y, x + width, y + height), atol=6), (found, (x, y, width, height))
        corners = np.array(entry["box"])
        assert corners.shape == (4, 2)
        assert np.allclose(corners.min(axis=0), found[:2], atol=1.5)
        assert np.allclose(corners.max(axis=0), found[2:], atol=1.5)
        assert 0.9 <= entry["confidence"] <= 1 and rectangle["confidence"] == pytest.approx(entry["confidence"],
                                                                                              abs=1e-4)
    assert [m["model"] for m in ctx["models"]] == ["ocr_det", "ocr_rec"]


def test_a_wrong_lot_is_read_as_such_and_makes_the_part_ng(ocr_server: Server) -> None:
    image, _ = label(("LOT 2024-B17", SERIAL))
    ctx = analyze(ocr_server, image)
    assert ctx["text"] == f"LOT 2024-B17\n{SERIAL}"
    assert ctx["ocr_match"] is False and ctx["result"] is False
    (outcome,) = ctx["evaluation"]
    assert outcome["rule"] == "key_equals" and outcome["passed"] is False


def test_a_serial_number_alone_reads_exactly_and_misses_the_lot_pattern(ocr_server: Server) -> None:
    image, _ = label(("SN 30571-QD2",), font=cv2.FONT_HERSHEY_DUPLEX, scale=1.1)
    ctx = analyze(ocr_server, image)
    assert ctx["text"] == "SN 30571-QD2" and ctx["result"] is False


def test_request_keeps_the_most_confident_lines_and_drops_the_unsure(ocr_server: Server) -> None:
    image, _ = label()
    full = analyze(ocr_server, image)
    best = max(full["ocr"], key=lambda entry: entry["confidence"])
    one = analyze(ocr_server, image, "?max_labels=1")
    assert [entry["text"] for entry in one["ocr"]] == [best["text"]] and len(one["detectedRectangles"]) == 1
    none = analyze(ocr_server, image, "?min_confidence=1")
    assert none["text"] == "" and none["ocr"] == [] and none["result"] is False


def test_an_upside_down_tilted_label_reads_with_the_angle_classifier_at_static_shapes(tmp_path: Path) -> None:
    """In process (the same Project the server runs), static shapes as for an NPU, a 180 degree label."""
    from appliance.frames import Frame
    from appliance.project import Project

    flow = {"nodes": {"read": {"type": "ocr@1", "shapes": "static", "angle_classifier": True}}}
    project = Project.load(write_project(tmp_path / "p", flow, models_dir=str(STORE)))
    project.prepare()
    try:
        image, _ = label()
        turned = cv2.rotate(image, cv2.ROTATE_180)
        ctx = project.inspect(Frame(turned, "test"), "")
        assert ctx["text"] == f"{SERIAL}\n{LOT}"  # the lines are upside down: the serial is on top
        assert [m["model"] for m in ctx["models"]] == ["ocr_det", "ocr_rec", "ocr_cls"]
        # Tilted by 8 degrees (counter-clockwise on screen): the rotated box follows the line.
        tilt = cv2.getRotationMatrix2D((480, 270), 8, 1.0)
        tilted = cv2.warpAffine(image, tilt, (960, 540), borderMode=cv2.BORDER_REPLICATE)
        ctx = project.inspect(Frame(tilted, "test"), "")
        assert ctx["text"] == f"{LOT}\n{SERIAL}"
        for entry in ctx["ocr"]:
            (x0, y0), (x1, y1) = entry["box"][0], entry["box"][1]  # top-left, top-right
            assert math.degrees(math.atan2(y0 - y1, x1 - x0)) == pytest.approx(8, abs=1.5)
    finally:
        project.close()


def test_ctc_greedy_merges_repeats_drops_blanks_and_restores_a_lost_space() -> None:
    labels = ["<blank>", "A", "B", "1", " "]

    def steps(*rows: tuple[int, float]) -> np.ndarray:
        """One step per (best class, its probability); the rest shared evenly by the other classes."""
        matrix = np.zeros((len(rows), len(labels)), np.float32)
        for t, (best, p) in enumerate(rows):
            matrix[t] = (1 - p) / (len(labels) - 1)
            matrix[t, best] = p
        return matrix

    # A A _ A B B _ 1 1: repeats merge, a blank separates the two A's, the space class is the last label.
    probabilities = steps((1, 0.9), (1, 0.8), (0, 0.99), (1, 0.7), (2, 0.6), (2, 0.9), (0, 0.9), (3, 0.5), (3, 1.0))
    text, confidence = ctc_greedy(probabilities, labels)
    assert text == "AAB1"
    assert confidence == pytest.approx((0.9 + 0.7 + 0.6 + 0.5) / 4)  # the first step of each kept character
    assert ctc_greedy(steps((0, 0.9), (0, 0.9)), labels) == ("", 0.0)
    assert ctc_greedy(steps((1, 0.9), (4, 0.8), (2, 0.9)), labels)[0] == "A B"  # a space the model chose
    # A _ B _ 1 _ _ _ A: blank wins everywhere between 1 and A, but the space class reaches 0.3 there and the
    # gap is twice the others: a space; with plain greedy decoding (threshold 1) none.
    lost = steps((1, 0.9), (0, 0.9), (2, 0.9), (0, 0.9), (3, 0.9), (0, 0.9), (0, 0.6), (0, 0.9), (1, 0.9))
    lost[6] = [0.6, 0, 0, 0.1, 0.3]
    assert ctc_greedy(lost, labels, 0.2)[0] == "AB1 A"
    assert ctc_greedy(lost, labels, 1.0)[0] == "AB1A"
    lost[6] = [0.9, 0, 0, 0, 0.1]  # too little evidence
    assert ctc_greedy(lost, labels, 0.2)[0] == "AB1A"
    # Evidence, but in a gap no wider than the others (A _ B _ 1 _ A): no space.
    tight = steps((1, 0.9), (0, 0.9), (2, 0.9), (0, 0.9), (3, 0.9), (0, 0.6), (1, 0.9))
    tight[5] = [0.6, 0, 0, 0.1, 0.3]
    assert ctc_greedy(tight, labels, 0.2)[0] == "AB1A"


def test_the_alphabet_comes_from_the_recogniser_and_fits_its_classes() -> None:
    import openvino as ov

    version = resolve_version(STORE, "ocr_rec")
    labels = read_alphabet(version)
    assert len(labels) == 6623 + 2 and labels[0] == "<blank>" and labels[-1] == " "
    assert all(char in labels for char in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-./:")
    classes = ov.Core().read_model(str(version / "model.onnx")).outputs[0].get_partial_shape()[-1].get_length()
    assert classes == len(labels)


def test_rows_are_read_top_to_bottom_and_boxes_on_one_row_left_to_right() -> None:
    def box(x: float, y: float, width: float = 100, height: float = 30) -> np.ndarray:
        return np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height]], np.float32)

    # "2024-A17" right of "LOT" and 6 px lower; "SN ..." on the next row; a row above both, given last.
    boxes = [box(300, 106), box(40, 100), box(40, 160), box(40, 40, 300)]
    assert reading_order(boxes) == [[3], [1, 0], [2]]
    # A label tilted by 20 degrees: two long lines 40 px apart overlap in y, yet stay two rows.
    turn = cv2.getRotationMatrix2D((200, 100), -20, 1.0)
    tilted = [np.c_[b, np.ones(4)] @ turn.T for b in (box(40, 60, 320), box(40, 100, 320))]
    assert max(tilted[0][:, 1]) > min(tilted[1][:, 1])
    assert reading_order(tilted[::-1]) == [[1], [0]]


def test_expected_matches_a_whole_row_or_the_whole_text() -> None:
    lot = re.compile(r"LOT \d{4}-[A-Z]\d{2}")
    assert text_matches(lot, "ACME\nLOT 2024-A17\nSN 1")
    assert not text_matches(lot, "LOT 2024-A170")  # in full, not a part of a row
    assert text_matches(re.compile(r"ACME\nLOT .*"), "ACME\nLOT 2024-A17")


def test_check_refuses_a_bad_pattern_and_names_a_missing_model(tmp_path: Path) -> None:
    from appliance.errors import ConfigError
    from appliance.project import Project

    bad = {"nodes": {"read": {"type": "ocr@1", "expected": "LOT (2024"}}}
    with pytest.raises(ConfigError, match=r"nodes\.read\.expected: not a regular expression"):
        Project.load(write_project(tmp_path / "bad", bad, models_dir=str(STORE)))
    missing = {"nodes": {"read": {"type": "ocr@1", "rec_model": "nothing_here"}}}
    with pytest.raises(ConfigError, match=r"nodes\.read\.rec_model: model 'nothing_here'"):
        Project.load(write_project(tmp_path / "missing", missing, models_dir=str(STORE)))
    wrong = {"nodes": {"read": {"type": "ocr@1", "rec_model": "ocr_det"}}}
    with pytest.raises(ConfigError, match="model 'ocr_det' is an OCR detector, not an OCR recogniser"):
        Project.load(write_project(tmp_path / "wrong", wrong, models_dir=str(STORE)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(REPO / "projects" / "ocr-label", log_file=tmp_path_factory.mktemp("ocr-label") / "log")
    yield server
    server.stop()


def test_demo_project_reads_a_rendered_label(demo: Server) -> None:
    image, _ = label(("LOT 2025-C42", "SN 11873-PW4"), font=cv2.FONT_HERSHEY_TRIPLEX, scale=1.2)
    ctx = analyze(demo, image)
    assert ctx["text"] == "LOT 2025-C42\nSN 11873-PW4" and ctx["result"] is True
    ctx = analyze(demo, cv2.rotate(label(("EXP 2026-03-14",))[0], cv2.ROTATE_180))
    assert ctx["text"] == "EXP 2026-03-14" and ctx["ocr_match"] is False and ctx["result"] is False
