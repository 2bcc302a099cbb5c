"""The demo project `make run` serves: frames written and a model trained at set-up, then real verdicts over HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest
import requests
import yaml

from appliance.runtime.store import read_current
from appliance.training.anomaly import compile_anomaly_model, predict
from appliance.training.demo_setup import BAD, CHECK_GOOD, MODEL, TRAIN_GOOD, set_up
from tests.conftest import REPO, Server, start_server


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory: pytest.TempPathFactory, backbone_xml: Path) -> Path:
    """projects/demo's project.yaml in an empty folder (its flow by absolute path), set up as `make demo` does."""
    project = tmp_path_factory.mktemp("demo") / "demo"
    project.mkdir()
    config = yaml.safe_load((REPO / "projects/demo/project.yaml").read_text())
    config["flow"] = str(REPO / "projects/demo" / config["flow"])
    (project / "project.yaml").write_text(yaml.safe_dump(config))
    assert set_up(project, backbone=backbone_xml) == 0
    return project


@pytest.fixture(scope="module")
def demo(demo_copy: Path) -> Iterator[Server]:
    server = start_server(demo_copy)
    yield server
    server.stop()


def read(path: Path) -> bytes:
    return path.read_bytes()


def test_set_up_writes_the_frames_and_one_model_version_once(demo_copy: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    images = demo_copy / "images"
    assert len(list((images / "good").glob("*.png"))) == TRAIN_GOOD
    assert len(list((images / "bad").glob("*.png"))) == len(list((images / "masks").glob("*.png"))) == BAD
    assert len(list((images / "check").glob("*.png"))) == CHECK_GOOD
    assert read_current(demo_copy / "models" / MODEL) == "1"
    spec = yaml.safe_load((demo_copy / "models" / MODEL / "1" / "spec.yaml").read_text())
    assert spec["training"]["images"] == TRAIN_GOOD
    capsys.readouterr()
    assert set_up(demo_copy) == 0  # done already: neither frames nor a second version
    assert "has version 1" in capsys.readouterr().out
    assert not (demo_copy / "models" / MODEL / "2").exists()


def test_fresh_good_parts_pass_without_rectangles(demo: Server, demo_copy: Path) -> None:
    for path in sorted((demo_copy / "images" / "check").glob("*.png")):
        ctx = requests.post(f"{demo.url}/analyze_image", data=read(path)).json()
        assert ctx["result"] is True and ctx["score"] < ctx["threshold"], (path.name, ctx["score"])
        assert ctx["detectedRectangles"] == []
        assert ctx["models"] == [{"node": "surface", "model": MODEL, "version": "1", "device": "CPU"}]


def test_every_defect_kind_is_ng_with_one_rectangle_that_covers_the_defect(demo: Server, demo_copy: Path) -> None:
    for path in sorted((demo_copy / "images" / "bad").glob("*.png")):
        ctx = requests.post(f"{demo.url}/analyze_image", data=read(path)).json()
        assert ctx["result"] is False and ctx["score"] > ctx["threshold"], (path.name, ctx["score"])
        mask = cv2.imread(str(demo_copy / "images" / "masks" / path.name), cv2.IMREAD_GRAYSCALE) > 0
        ys, xs = np.nonzero(mask)
        # One defect, one rectangle: a thin scratch is not cut into pieces, the tile around it adds none.
        (rect,) = ctx["detectedRectangles"]
        assert rect["source"]["type"] == "UNSUPERVISED"
        x0, y0, x1, y1 = rect["x"], rect["y"], rect["x"] + rect["width"], rect["y"] + rect["height"]
        # It holds the defect's centre and nearly all of the defect (the map is blurred, so it is a little wider).
        assert x0 <= xs.mean() <= x1 and y0 <= ys.mean() <= y1, (path.name, rect)
        inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        assert inside.mean() >= 0.9, (path.name, rect, inside.mean())


def test_heatmap_is_hot_on_the_defect_and_the_annotated_image_frames_it(demo: Server, demo_copy: Path) -> None:
    body = read(demo_copy / "images" / "bad" / "bad_001_spot.png")
    mask = cv2.imread(str(demo_copy / "images" / "masks" / "bad_001_spot.png"), cv2.IMREAD_GRAYSCALE) > 0
    response = requests.post(f"{demo.url}/analyze_image?response_type=heatmap&context_in_body", data=body)
    length = int(response.headers["ImageLen"])
    heat = cv2.imdecode(np.frombuffer(response.content[:length], np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert heat.shape == (384, 512, 3)
    # Jet colour map: red minus blue is high where the map is hot.
    hotness = heat[:, :, 2] - heat[:, :, 0]
    assert hotness[mask].mean() > 100 > hotness[~mask].mean() + 100, (hotness[mask].mean(), hotness[~mask].mean())

    response = requests.post(f"{demo.url}/analyze_image?response_type=annotated_image&context_in_body", data=body)
    length = int(response.headers["ImageLen"])
    annotated = cv2.imdecode(np.frombuffer(response.content[:length], np.uint8), cv2.IMREAD_COLOR)
    (rect,) = json.loads(response.content[length:])["detectedRectangles"]
    # The flow's colour for defects (#ff0000) on the rectangle's left edge, over the blended heat map.
    x, y, height = round(rect["x"]), round(rect["y"]), round(rect["height"])
    assert annotated[y + height // 2, x].tolist() == [0, 0, 255]
    # "NG" in red in the top-left corner.
    corner = annotated[8:30, 8:50].astype(int)
    assert ((corner[:, :, 2] > 200) & (corner[:, :, 1] < 60)).sum() > 40


def test_the_line_scores_a_frame_as_training_did(demo: Server, demo_copy: Path) -> None:
    """The threshold is calibrated on frames sized by the trainer: the line must size a 512x384 frame the same way
    (area, not a linear resize in the graph), or its scores drift from the ones the threshold was fitted on."""
    model = ov.Core().read_model(demo_copy / "models" / MODEL / "1" / "model.xml")
    compiled = compile_anomaly_model(model)
    for path in sorted((demo_copy / "images" / "check").glob("*.png"))[:6]:
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert frame.shape == (384, 512, 3)
        trained_score, _ = predict(compiled, frame)
        served = requests.post(f"{demo.url}/analyze_image", data=read(path)).json()["score"]
        assert served == pytest.approx(trained_score, rel=1e-3), path.name
