"""segment@1 on colour segmenters built here: per-class logits, and a map of class ids, behind a crop."""

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

from appliance.runtime.store import switch_current, write_manifest
from tests.conftest import Server, start_server, write_project

LABELS = [{"id": 0, "name": "background"}, {"id": 1, "name": "rust", "color": "#ff0000", "names": {"de": "Rost"}},
          {"id": 2, "name": "paint", "color": "#0000ff"}]


def save_segmenter(store: Path, name: str, class_ids: bool, activation: str | None = None) -> None:
    """Per pixel: background logit 0, 'rust' 20 (R - G/2 - B/2 - 0.3), 'paint' the same for blue.
    With ``class_ids`` the model returns the argmax as integer ids instead of the logits. With the spec's
    ``activation`` ("softmax") the runtime appends the best class and its probability to the graph."""
    image = ops.parameter([1, 3, 32, 32], ov.Type.f32, name="input")
    red, green, blue = ops.split(image, ops.constant(np.int64(1)), 3).outputs()

    def score(main: ov.Output, other_a: ov.Output, other_b: ov.Output) -> ov.Node:
        others = ops.multiply(ops.add(other_a, other_b), ops.constant(np.float32(0.5)))
        return ops.multiply(ops.subtract(ops.subtract(main, others), ops.constant(np.float32(0.3))),
                            ops.constant(np.float32(20)))

    background = ops.multiply(red, ops.constant(np.float32(0)))
    logits = ops.concat([background, score(red, green, blue), score(blue, red, green)], 1)
    output = ops.topk(logits, ops.constant(np.int64(1)), 1, "max", "none", ov.Type.i32).output(1) if class_ids \
        else logits.output(0)
    output.set_names({"classes"})
    version_dir = store / name / "1"
    version_dir.mkdir(parents=True)
    ov.save_model(ov.Model([output], [image], name), version_dir / "model.xml")
    spec = {"task": "segment", "labels": LABELS,
            "input": {"size": [32, 32], "element_type": "f32", "layout": "NCHW", "colour_order": "RGB",
                      "scale": 1 / 255}}
    if activation is not None:
        spec["activation"] = activation
    (version_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    write_manifest(version_dir)
    switch_current(store / name, "1")


def panel() -> bytes:
    """640x480 black; a red square 160x160 at (100, 120); a blue bar 160x60 at (400, 300)."""
    image = np.zeros((480, 640, 3), np.uint8)
    image[120:280, 100:260] = (0, 0, 255)
    image[300:360, 400:560] = (255, 0, 0)
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module", params=["logits", "class_ids", "logits_in_graph"])
def segmenter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flow = {"nodes": {
        "roi": {"type": "crop@1", "x": 40, "y": 40, "width": 560, "height": 400, "next": ["surface"]},
        "surface": {"type": "segment@1", "model": "colours", "min_area": 500, "overrides": ["threshold"],
                    "next": ["verdict"]},
        "verdict": {"type": "evaluate@1", "rules": [{"rule": "no_rectangles", "label": "rust"}]},
    }}
    project = write_project(tmp_path_factory.mktemp("segment") / "p", flow)
    save_segmenter(project / "models", "colours", class_ids=request.param == "class_ids",
                   activation="softmax" if request.param == "logits_in_graph" else None)
    server = start_server(project)
    yield server
    server.stop()


def near(actual: float, expected: float, tolerance: float) -> bool:
    return abs(actual - expected) <= tolerance


def test_regions_become_labelled_rectangles_in_frame_pixels(segmenter: Server) -> None:
    ctx = requests.post(f"{segmenter.url}/analyze_image", data=panel()).json()
    rectangles = {r["classNames"][0]["label"]: r for r in ctx["detectedRectangles"]}
    assert set(rectangles) == {"rust", "paint"}
    # One map cell is 560/32 = 17.5 by 400/32 = 12.5 frame pixels.
    rust, paint = rectangles["rust"], rectangles["paint"]
    assert near(rust["x"], 100, 18) and near(rust["y"], 120, 13)
    assert near(rust["width"], 160, 36) and near(rust["height"], 160, 26)
    assert near(paint["x"], 400, 18) and near(paint["y"], 300, 13) and near(paint["width"], 160, 36)
    assert near(rust["area"], 160 * 160, 0.3 * 160 * 160) and near(paint["area"], 160 * 60, 0.4 * 160 * 60)
    assert rust["source"]["type"] == "SURFACE" and rust["classNames"][0]["color"] == "#ff0000"
    assert rust["classNames"][0]["id"] == 1 and paint["classNames"][0]["id"] == 2
    assert {c["label"]: c["regions"] for c in ctx["surfaceClasses"]} == {"rust": 1, "paint": 1}
    assert ctx["result"] is False  # rust is NG; paint alone would pass
    assert "Rost" in {r["classNames"][0]["label"]
                      for r in requests.post(f"{segmenter.url}/analyze_image?lang=de", data=panel()).json()[
                          "detectedRectangles"]}


def test_heat_map_marks_the_regions(segmenter: Server) -> None:
    response = requests.post(f"{segmenter.url}/analyze_image?response_type=heatmap&context_in_body", data=panel())
    length = int(response.headers["ImageLen"])
    heat = cv2.imdecode(np.frombuffer(response.content[:length], np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert heat.shape == (400, 560, 3)  # the crop's geometry
    inside, outside = heat[200 - 40, 180 - 40], heat[60 - 40, 580 - 40]
    assert inside[2] > 100 and inside[0] < 60, inside  # jet: hot is red
    assert outside[2] == 0 and outside[1] == 0, outside  # zero heat is dark blue


def test_small_regions_are_dropped(tmp_path: Path) -> None:
    flow = {"nodes": {"surface": {"type": "segment@1", "model": "colours", "min_area": 5000}}}
    project = write_project(tmp_path / "p", flow)
    save_segmenter(project / "models", "colours", class_ids=False)
    server = start_server(project)
    try:
        ctx = requests.post(f"{server.url}/analyze_image", data=panel()).json()
        # The 160x60 bar (9600 px) stays, the 160x160 square too; with 20000 only the square would.
        assert {r["classNames"][0]["label"] for r in ctx["detectedRectangles"]} == {"rust", "paint"}
        small = requests.post(f"{server.url}/analyze_image", data=cv2.imencode(".png", np.pad(
            np.full((50, 50, 3), (0, 0, 255), np.uint8), ((215, 215), (295, 295), (0, 0))))[1].tobytes()).json()
        assert small["detectedRectangles"] == [] and small["surfaceClasses"] == []
    finally:
        server.stop()


def test_argmax_and_softmax_in_the_graph_give_the_numpy_answer(tmp_path: Path) -> None:
    """The same logits, post-processed by the graph (spec activation "softmax") and by numpy (none named): same rectangles,
    areas and mean probabilities, to float noise."""
    answers = []
    for activation in (None, "softmax"):
        project = write_project(tmp_path / f"p{activation}", {"nodes": {"surface": {"type": "segment@1", "model": "c"}}})
        save_segmenter(project / "models", "c", class_ids=False, activation=activation)
        server = start_server(project)
        try:
            answers.append(requests.post(f"{server.url}/analyze_image", data=panel()).json())
        finally:
            server.stop()
    numpy_answer, graph_answer = ({(r["classNames"][0]["label"], r["x"], r["y"], r["width"], r["height"], r["area"]):
                                   r["classNames"][0]["confidence"] for r in answer["detectedRectangles"]}
                                  for answer in answers)
    assert numpy_answer.keys() == graph_answer.keys() and len(numpy_answer) == 2
    assert all(abs(numpy_answer[key] - graph_answer[key]) < 1e-3 for key in numpy_answer)
