"""Every registered node type on a real frame through a real flow (issue 16, item 5): Project.load, prepare, one
frame through the flow runner, and what a user checks for that type. The types come from the registry, so a new
node type fails here until it has a case in CASES."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from appliance.context import Context
from appliance.faces_gallery import enrol
from appliance.frames import Frame
from appliance.nodes import NODE_TYPES
from appliance.project import Project
from appliance.runtime.store import read_current
from appliance.training.demo_setup import MODEL as DEMO_MODEL
from appliance.training.demo_setup import set_up
from tests.conftest import REPO, write_project
from tests.nodes.test_ocr import LOT, SERIAL
from tests.nodes.test_ocr import ROI as OCR_ROI
from tests.nodes.test_ocr import label as ocr_label
from tests.nodes.test_segment import panel, save_segmenter

STORE = REPO / "models"  # `make models`
ASTRONAUT = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # 512 x 512, Eileen Collins' face near (179, 82)
# BlazeFace short range on the astronaut (MODELS.md): 0.92 at (179, 82)-(271, 175).
ASTRONAUT_FACE = (179, 82, 271 - 179, 175 - 82)

# A Code hook that reports the dark part of the image it sees, so that a rectangle found after a geometric node
# shows where that node's pixels land in the input frame.
FIND_DARK = """
import cv2
def main(context):
    image = context["image"]
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    x, y, w, h = cv2.boundingRect((gray < 50).astype("uint8"))
    context["detectedRectangles"].append({"x": x, "y": y, "width": w, "height": h})
"""
DARK_PART = (200, 120, 80, 40)  # x, y, width, height in the frame of `part_frame`


def part_frame() -> np.ndarray:
    """600 x 400, a gradient (so that a mirrored or turned image differs from the original) and a dark part."""
    image = np.zeros((400, 600, 3), np.uint8)
    image[:, :, 0] = np.linspace(60, 250, 600, dtype=np.uint8)[None, :]
    image[:, :, 1] = np.linspace(80, 240, 400, dtype=np.uint8)[:, None]
    image[:, :, 2] = 180
    x, y, width, height = DARK_PART
    image[y:y + height, x:x + width] = 10
    return image


def box(rectangle: dict) -> tuple[int, int, int, int]:
    return rectangle["x"], rectangle["y"], rectangle["width"], rectangle["height"]


Check = Callable[[Context, np.ndarray], None]


@dataclass
class Case:
    """A project whose node `node` is of the type under test, the frame it inspects, and what a user checks."""

    project: Path
    frame: np.ndarray
    check: Check


def geometry_case(folder: Path, node: dict, check: Check) -> Case:
    flow = {"nodes": {"node": {**node, "next": ["find"]}, "find": {"type": "code@1", "module": "find"}}}
    return Case(write_project(folder, flow, hooks={"find": FIND_DARK}), part_frame(), check)


def crop(folder: Path) -> Case:
    def check(ctx: Context, frame: np.ndarray) -> None:
        assert np.array_equal(ctx["image"], frame[50:250, 100:400])
        assert [box(r) for r in ctx["detectedRectangles"]] == [DARK_PART]

    return geometry_case(folder, {"type": "crop@1", "x": 100, "y": 50, "width": 300, "height": 200}, check)


def resize(folder: Path) -> Case:
    def check(ctx: Context, frame: np.ndarray) -> None:
        assert ctx["image"].shape == (100, 150, 3)  # width alone keeps the aspect ratio
        (found,) = ctx["detectedRectangles"]
        # One pixel after the resize is 4 frame pixels: the part is found to within one of them.
        assert np.allclose(box(found), DARK_PART, atol=4), box(found)

    return geometry_case(folder, {"type": "resize@1", "width": 150}, check)


def rotate(folder: Path) -> Case:
    def check(ctx: Context, frame: np.ndarray) -> None:
        assert np.array_equal(ctx["image"], np.rot90(frame))  # 90 degrees counter-clockwise, exact
        assert [box(r) for r in ctx["detectedRectangles"]] == [DARK_PART]
        assert ctx["angle"] == 90

    return geometry_case(folder, {"type": "rotate@1", "angle": 90}, check)


def flip(folder: Path) -> Case:
    def check(ctx: Context, frame: np.ndarray) -> None:
        assert np.array_equal(ctx["image"], frame[:, ::-1])
        assert [box(r) for r in ctx["detectedRectangles"]] == [DARK_PART]

    return geometry_case(folder, {"type": "flip@1", "direction": "horizontal"}, check)


def color(folder: Path) -> Case:
    def check(ctx: Context, frame: np.ndarray) -> None:
        assert np.array_equal(ctx["image"], cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        assert [box(r) for r in ctx["detectedRectangles"]] == [DARK_PART]

    return geometry_case(folder, {"type": "color@1", "to": "gray"}, check)


def mask(folder: Path) -> Case:
    def check(ctx: Context, frame: np.ndarray) -> None:
        # The dark part is painted over: the hook after the mask finds no dark pixel (OpenCV's empty box), and
        # nothing but the masked rectangle changed.
        assert [box(r) for r in ctx["detectedRectangles"]] == [(0, 0, 0, 0)]
        expected = frame.copy()
        expected[110:170, 190:290] = (255, 255, 255)
        assert np.array_equal(ctx["image"], expected)

    return geometry_case(folder, {"type": "mask@1", "rectangles": [{"x": 190, "y": 110, "width": 100, "height": 60}],
                                  "fill": [255, 255, 255]}, check)


def code(folder: Path) -> Case:
    hook = """
    def main(context, form):
        context["detectedRectangles"].append({"x": form["x"], "y": 5, "width": 20, "height": 10})
        context["result"] = False
        print("checked", context["imageShape"]["width"])
    """
    flow = {"nodes": {"node": {"type": "code@1", "module": "mark", "form": {"x": 30}}}}

    def check(ctx: Context, frame: np.ndarray) -> None:
        assert ctx["result"] is False and ctx["stdout"] == "checked 600\n"
        assert [box(r) for r in ctx["detectedRectangles"]] == [(30, 5, 20, 10)]

    return Case(write_project(folder, flow, hooks={"mark": hook}), part_frame(), check)


def evaluate(folder: Path) -> Case:
    flow = {"nodes": {"find": {"type": "code@1", "module": "find", "next": ["node"]},
                      "node": {"type": "evaluate@1", "rules": [{"rule": "max_rectangles", "count": 0}]}}}

    def check(ctx: Context, frame: np.ndarray) -> None:
        assert ctx["result"] is False
        assert ctx["evaluation"] == [{"node": "node", "rule": "max_rectangles", "passed": False,
                                      "detail": "1 rectangle(s), at most 0 allowed"}]

    return Case(write_project(folder, flow, hooks={"find": FIND_DARK}), part_frame(), check)


def demo_project(folder: Path) -> Path:
    """projects/demo with its frames and anomaly model (`make demo`), else the same set up here."""
    demo = REPO / "projects" / "demo"
    if read_current(demo / "models" / DEMO_MODEL) is not None and (demo / "images" / "bad").is_dir():
        return demo
    folder.mkdir(parents=True)
    assert set_up(folder) == 0
    return folder


def anomaly(folder: Path) -> Case:
    demo = demo_project(folder / "demo")
    flow = {"nodes": {"node": {"type": "anomaly@1", "model": DEMO_MODEL, "min_area": 64, "label": "defect",
                               "next": ["verdict"]},
                      "verdict": {"type": "evaluate@1", "rules": [{"rule": "score_below"}]}}}
    project = write_project(folder / "p", flow, models_dir=str(demo / "models"), cache_dir=str(folder / "cache"))
    spot = cv2.imread(str(demo / "images" / "bad" / "bad_001_spot.png"), cv2.IMREAD_COLOR)
    defect = cv2.imread(str(demo / "images" / "masks" / "bad_001_spot.png"), cv2.IMREAD_GRAYSCALE) > 0

    def check(ctx: Context, frame: np.ndarray) -> None:
        assert ctx["result"] is False and ctx["score"] >= ctx["threshold"] > 0
        ys, xs = np.nonzero(defect)
        centre = xs.mean(), ys.mean()
        (found,) = ctx["detectedRectangles"]
        assert found["classNames"][0]["label"] == "defect" and found["source"]["type"] == "UNSUPERVISED"
        x, y, width, height = box(found)
        assert x <= centre[0] <= x + width and y <= centre[1] <= y + height, (box(found), centre)
        # The heat map, brought to frame pixels through its own geometry, is hotter on the defect than off it.
        (heat,) = ctx["heatmaps"]
        height, width = frame.shape[:2]
        in_frame = cv2.warpAffine(np.asarray(heat["map"], np.float32), heat["to_frame"][:2], (width, height))
        assert heat["node"] == "node" and in_frame[defect].mean() > 2 * in_frame[~defect].mean()

    return Case(project, spot, check)


def classify(folder: Path) -> Case:
    flow = {"nodes": {"node": {"type": "classify@1", "model": "efficientnet_lite0", "fit": "center_crop",
                               "threshold": 0.2, "next": ["verdict"]},
                      "verdict": {"type": "evaluate@1", "rules": [{"rule": "top_class", "labels": ["espresso"]}]}}}

    def check(ctx: Context, frame: np.ndarray) -> None:
        (result,) = ctx["classification"]
        assert result["predicted"][0]["label_name"] == "espresso" and result["predicted"][0]["score"] >= 0.9
        assert ctx["result"] is True

    project = write_project(folder, flow, models_dir=str(STORE), cache_dir=str(folder / "cache"))
    return Case(project, cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), check)


def segment(folder: Path) -> Case:
    flow = {"nodes": {"roi": {"type": "crop@1", "x": 40, "y": 40, "width": 560, "height": 400, "next": ["node"]},
                      "node": {"type": "segment@1", "model": "colours", "min_area": 500}}}
    project = write_project(folder, flow)
    save_segmenter(project / "models", "colours", class_ids=False)

    def check(ctx: Context, frame: np.ndarray) -> None:
        regions = {r["classNames"][0]["label"]: box(r) for r in ctx["detectedRectangles"]}
        assert set(regions) == {"rust", "paint"}
        # One map cell is 560/32 = 17.5 by 400/32 = 12.5 frame pixels (tests/nodes/test_segment.py).
        assert np.allclose(regions["rust"][:2], (100, 120), atol=(18, 13)), regions
        assert np.allclose(regions["paint"][:2], (400, 300), atol=(18, 13)), regions

    return Case(project, cv2.imdecode(np.frombuffer(panel(), np.uint8), cv2.IMREAD_COLOR), check)


def detect(folder: Path) -> Case:
    flow = {"nodes": {"node": {"type": "detect@1", "model": "face_short"}}}

    def check(ctx: Context, frame: np.ndarray) -> None:
        (face,) = ctx["detectedRectangles"]
        assert face["classNames"][0]["label"] == "face" and face["source"]["type"] == "DETECTION"
        assert face["confidence"] > 0.85 and np.allclose(box(face), ASTRONAUT_FACE, atol=4), box(face)

    return Case(write_project(folder, flow, models_dir=str(STORE), cache_dir=str(folder / "cache")), ASTRONAUT, check)


def faces(folder: Path) -> Case:
    flow = {"nodes": {"node": {"type": "faces@1", "model": "face_short", "mode": "fill", "color": "#3366cc",
                               "margin": 0}}}

    def check(ctx: Context, frame: np.ndarray) -> None:
        (face,) = ctx["faces"]
        assert face["node"] == "node" and face["score"] > 0.85 and len(face["keypoints"]) == 6
        x, y, width, height = face["box"]
        assert np.allclose((x, y, width, height), ASTRONAUT_FACE, atol=4), face["box"]
        assert (ctx["image"][y:y + height, x:x + width] == (0xcc, 0x66, 0x33)).all()  # #3366cc in BGR
        outside = np.ones(frame.shape[:2], bool)
        outside[y:y + height, x:x + width] = False
        assert np.array_equal(ctx["image"][outside], frame[outside])

    return Case(write_project(folder, flow, models_dir=str(STORE), cache_dir=str(folder / "cache")), ASTRONAUT, check)


def identify(folder: Path) -> Case:
    flow = {"nodes": {"faces": {"type": "faces@1", "model": "face_full", "mode": "none", "next": ["node"]},
                      "node": {"type": "identify@1"}}}
    project = write_project(folder, flow, models_dir=str(STORE), cache_dir=str(folder / "cache"))
    assert enrol(project, "eileen", [ASTRONAUT]) == 1
    # A turned, smaller copy on a grey canvas: not the enrolled picture itself.
    turn = cv2.getRotationMatrix2D((225, 128), 15, 0.8)
    turned = cv2.warpAffine(ASTRONAUT, turn, (640, 560), borderValue=(90, 90, 90))

    def check(ctx: Context, frame: np.ndarray) -> None:
        (face,) = ctx["faces"]
        assert face["identity"] == "eileen" and face["distance"] < 0.35, face

    return Case(project, turned, check)


def demographics(folder: Path) -> Case:
    flow = {"nodes": {"faces": {"type": "faces@1", "model": "face_short", "mode": "none", "next": ["node"]},
                      "node": {"type": "demographics@1"}}}

    def check(ctx: Context, frame: np.ndarray) -> None:
        (face,) = ctx["faces"]
        assert face["gender"] == "female" and 20 <= face["age"] <= 60, face

    return Case(write_project(folder, flow, models_dir=str(STORE), cache_dir=str(folder / "cache")), ASTRONAUT, check)


def ocr(folder: Path) -> Case:
    flow = {"nodes": {"roi": {"type": "crop@1", **OCR_ROI, "next": ["node"]},
                      "node": {"type": "ocr@1", "expected": r"LOT 2024-A1[0-9]", "next": ["verdict"]},
                      "verdict": {"type": "evaluate@1",
                                  "rules": [{"rule": "key_equals", "key": "ocr_match", "value": True}]}}}
    image, ink = ocr_label()

    def check(ctx: Context, frame: np.ndarray) -> None:
        assert ctx["text"] == f"{LOT}\n{SERIAL}" and ctx["result"] is True
        rectangles = ctx["detectedRectangles"]
        assert [r["classNames"][0]["label"] for r in rectangles] == [LOT, SERIAL]
        for rectangle, drawn in zip(rectangles, ink, strict=True):
            # DB boxes hug the ink: within 6 px of where OpenCV drew it (tests/nodes/test_ocr.py), in frame pixels.
            assert np.allclose(box(rectangle), drawn, atol=6), (box(rectangle), drawn)

    return Case(write_project(folder, flow, models_dir=str(STORE), cache_dir=str(folder / "cache")), image, check)


CASES: dict[str, Callable[[Path], Case]] = {
    "crop@1": crop, "resize@1": resize, "rotate@1": rotate, "flip@1": flip, "color@1": color, "mask@1": mask,
    "code@1": code, "evaluate@1": evaluate, "anomaly@1": anomaly, "classify@1": classify, "segment@1": segment,
    "detect@1": detect, "faces@1": faces, "identify@1": identify, "demographics@1": demographics, "ocr@1": ocr,
}


# Context.frame_box maps a box's edges with the node's pixel-index transform (x -> width - 1 - x for a mirror), so
# after flip@1 or rotate@1 a rectangle lands one pixel left of (or above) the part. Mapping the edges as
# x - 0.5 and adding 0.5 back makes all five geometry cases here exact. Remove an entry when it is fixed.
@pytest.mark.parametrize("tag", list(NODE_TYPES))
def test_every_registered_node_type_runs_on_a_real_frame_through_a_flow(tag: str, tmp_path: Path) -> None:
    make_case = CASES.get(tag)
    assert make_case is not None, f"node type {tag} has no case in tests/nodes/test_every_node.py: add one"
    case = make_case(tmp_path / "project")
    project = Project.load(case.project)
    try:
        project.prepare()
        (node,) = [node for node in project.nodes if node.id == "node"]
        assert type(node) is NODE_TYPES[tag].implementation
        ctx = project.inspect(Frame(case.frame, "test"), "")
    finally:
        project.close()
    assert ctx["errors"] == [], ctx["errors"]
    assert "node" in [node_id for node_id, _ in ctx["timings"]]
    case.check(ctx, case.frame)


def test_every_case_is_a_registered_node_type() -> None:
    assert sorted(set(CASES) - set(NODE_TYPES)) == []
