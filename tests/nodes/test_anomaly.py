"""anomaly@1 on a model of the same inputs and outputs as anomalib's OpenVINO export, built here."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest
import requests
import yaml
from openvino import opset13 as ops

from appliance.runtime.store import switch_current, write_manifest
from tests.conftest import write_project


def save_red_detector(store: Path, version: str = "1", threshold: float = 0.5,
                      pixel_threshold: float | None = None) -> None:
    """An 'anomalib-like' model: f32 NCHW RGB in [0, 1]; anomaly_map = the red channel; pred_score = its max.

    Reading the red channel makes a swapped colour order or a missing scale fail the tests. The pixel threshold
    is the image threshold unless given.
    """
    image = ops.parameter([1, 3, 64, 64], ov.Type.f32, name="input")
    red = ops.slice(image, ops.constant(np.array([0])), ops.constant(np.array([1])), ops.constant(np.array([1])),
                    ops.constant(np.array([1])))
    anomaly_map = ops.multiply(red, ops.constant(np.float32(1.0)), name="anomaly_map")
    anomaly_map.output(0).set_names({"anomaly_map"})
    score = ops.reshape(ops.reduce_max(anomaly_map, ops.constant(np.array([1, 2, 3])), keep_dims=False),
                        ops.constant(np.array([1])), special_zero=False, name="pred_score")
    score.output(0).set_names({"pred_score"})
    model = ov.Model([score, anomaly_map], [image], "red_detector")
    version_dir = store / "red" / version
    version_dir.mkdir(parents=True)
    ov.save_model(model, version_dir / "model.xml")
    spec = {"task": "anomaly", "input": {"name": "input", "size": [64, 64], "element_type": "f32", "layout": "NCHW",
                                         "colour_order": "RGB", "scale": 1 / 255},
            "outputs": {"score": "pred_score", "map": "anomaly_map"}, "threshold": threshold,
            "pixel_threshold": threshold if pixel_threshold is None else pixel_threshold}
    (version_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    write_manifest(version_dir)
    switch_current(store / "red", version)


FLOW = {"nodes": {
    "roi": {"type": "crop@1", "x": 100, "y": 50, "width": 320, "height": 320, "next": ["anomaly"]},
    "anomaly": {"type": "anomaly@1", "model": "red", "min_area": 100, "next": ["verdict"]},
    "verdict": {"type": "evaluate@1", "rules": [{"rule": "score_below"}]},
}}


def frame(colour: tuple[int, int, int]) -> bytes:
    image = np.zeros((480, 640, 3), np.uint8)
    image[130:210, 180:260] = colour  # an 80x80 square inside the ROI, at (180, 130) in the frame
    return cv2.imencode(".png", image)[1].tobytes()


@pytest.fixture(scope="module")
def red_server(tmp_path_factory):
    from tests.conftest import start_server

    project = write_project(tmp_path_factory.mktemp("anomaly") / "p", FLOW)
    save_red_detector(project / "models")
    server = start_server(project)
    yield server
    server.stop()


def test_anomalous_region_becomes_a_rectangle_in_frame_pixels(red_server):
    ctx = requests.post(f"{red_server.url}/analyze_image", data=frame((0, 0, 255))).json()
    assert ctx["result"] is False
    assert ctx["score"] == pytest.approx(1.0, abs=0.01) and ctx["threshold"] == 0.5
    (rect,) = ctx["detectedRectangles"]
    assert rect["source"]["type"] == "UNSUPERVISED" and rect["classNames"][0]["label"] == "anomaly"
    # The square is at x 180..260, y 130..210; the map is 64x64 for a 320x320 ROI, so 5 px per map pixel.
    assert abs(rect["x"] - 180) <= 6 and abs(rect["y"] - 130) <= 6
    assert abs(rect["width"] - 80) <= 11 and abs(rect["height"] - 80) <= 11
    assert ctx["models"] == [{"node": "anomaly", "model": "red", "version": "1", "device": "CPU"}]


def test_a_blue_square_is_not_red_so_the_colour_order_is_right(red_server):
    ctx = requests.post(f"{red_server.url}/analyze_image", data=frame((255, 0, 0))).json()
    assert ctx["result"] is True and ctx["score"] < 0.01 and ctx["detectedRectangles"] == []


def test_heatmap_answer_shows_the_region(red_server):
    response = requests.post(f"{red_server.url}/analyze_image?response_type=heatmap&context_in_body",
                             data=frame((0, 0, 255)))
    length = int(response.headers["ImageLen"])
    heat = cv2.imdecode(np.frombuffer(response.content[:length], np.uint8), cv2.IMREAD_COLOR)
    assert json.loads(response.content[length:])["result"] is False
    assert heat.shape == (320, 320, 3)
    inside, outside = heat[120, 120].astype(int), heat[300, 300].astype(int)
    # Jet colour map: the hottest value is dark red, the coldest dark blue.
    assert inside[2] > 100 and inside[0] < 50, inside
    assert outside[0] > 100 and outside[2] < 50, outside


@pytest.fixture(scope="module")
def hysteresis_server(tmp_path_factory):
    """The red detector with its regions cut lower than its threshold, as the discriminator's are: pixel 0.2,
    image 0.5."""
    from tests.conftest import start_server

    project = write_project(tmp_path_factory.mktemp("anomaly") / "p", FLOW)
    save_red_detector(project / "models", threshold=0.5, pixel_threshold=0.2)
    server = start_server(project)
    yield server
    server.stop()


def painted(*squares: tuple[int, int, int, int, int]) -> bytes:
    """A black frame with red rectangles (x, y, width, height, red level 0-255), in frame pixels."""
    image = np.zeros((480, 640, 3), np.uint8)
    for x, y, width, height, red in squares:
        image[y:y + height, x:x + width, 2] = red
    return cv2.imencode(".png", image)[1].tobytes()


def boxes(ctx: dict) -> list[tuple[float, float, float, float]]:
    return [(r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]) for r in ctx["detectedRectangles"]]


def test_a_region_below_the_image_threshold_gets_no_rectangle_beside_a_defect(hysteresis_server):
    # A defect (red 1.0 >= 0.5) and, apart from it, a faint patch (0.3: above the pixel threshold 0.2, below the
    # image threshold): the faint patch alone would pass the part, so it is no defect of its own.
    ctx = requests.post(f"{hysteresis_server.url}/analyze_image",
                        data=painted((180, 130, 60, 60, 255), (330, 250, 60, 60, 77))).json()
    assert ctx["result"] is False
    ((x0, y0, x1, y1),) = boxes(ctx)
    assert abs(x0 - 180) <= 6 and abs(y0 - 130) <= 6 and abs(x1 - 240) <= 6 and abs(y1 - 190) <= 6


def test_a_defect_whose_map_dips_between_two_peaks_is_one_rectangle(hysteresis_server):
    # Two strong ends joined by a faint stretch (0.3), as the discriminator maps a thin scratch that crosses light
    # mortar and dark brick: one rectangle from end to end, where a cut at the image threshold gives two.
    ctx = requests.post(f"{hysteresis_server.url}/analyze_image",
                        data=painted((150, 150, 30, 20, 255), (180, 150, 120, 20, 77), (300, 150, 30, 20, 255))).json()
    assert ctx["result"] is False
    ((x0, y0, x1, y1),) = boxes(ctx)
    assert abs(x0 - 150) <= 6 and abs(x1 - 330) <= 6 and abs(y0 - 150) <= 6 and abs(y1 - 170) <= 6
    # The heat map's middle is the image threshold: the faint stretch is cool, the ends hot.
    response = requests.post(f"{hysteresis_server.url}/analyze_image?response_type=heatmap",
                             data=painted((150, 150, 30, 20, 255), (180, 150, 120, 20, 77), (300, 150, 30, 20, 255)))
    heat = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR).astype(int)
    end, faint = heat[160 - 50, 165 - 100], heat[160 - 50, 240 - 100]  # the heat map is of the ROI at (100, 50)
    assert end[2] > 100 and end[0] < 50, end
    assert faint[2] < 100 and faint[0] > 100, faint


def test_missing_model_fails_check_with_a_hint(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    project = write_project(tmp_path / "p", FLOW)
    result = subprocess.run([sys.executable, "-m", "appliance", "check", str(project)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 78  # as `serve` exits for the same problem
    assert "nodes.anomaly.model: model 'red':" in result.stderr and "current` file" in result.stderr


@pytest.fixture
def two_versions(tmp_path, serve):
    project = write_project(tmp_path / "p", FLOW, api_key="k")
    save_red_detector(project / "models", "1", threshold=0.5)
    save_red_detector(project / "models", "2", threshold=2.0)  # the red square no longer counts as NG
    switch_current(project / "models" / "red", "1")
    return project, serve(project)


def test_switching_versions_over_http_while_frames_flow_loses_no_request(two_versions):
    import concurrent.futures
    import time

    project, server = two_versions
    body = frame((0, 0, 255))
    headers = {"X-API-Key": "k"}

    def send_for(seconds: float) -> list[tuple[int, str]]:
        answers = []
        deadline = time.monotonic() + seconds
        with requests.Session() as session:
            while time.monotonic() < deadline:
                response = session.post(f"{server.url}/analyze_image", data=body, headers=headers)
                answers.append((response.status_code, response.json().get("models", [{}])[0].get("version")))
        return answers

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        senders = [pool.submit(send_for, 2.5) for _ in range(2)]
        time.sleep(0.7)
        switched = requests.post(f"{server.url}/models/switch?model=red&version=2", headers=headers)
        answers = [a for sender in senders for a in sender.result()]
    assert switched.json() == {"status": 200, "message": "model red: 1 -> 2",
                               "data": {"model": "red", "version": "2", "previous": "1"}}
    assert {status for status, _ in answers} == {200}
    assert {version for _, version in answers} == {"1", "2"}
    after = requests.post(f"{server.url}/analyze_image", data=body, headers=headers).json()
    assert after["result"] is True and after["models"][0]["version"] == "2" and after["threshold"] == 2.0
    assert (project / "models" / "red" / "current").read_text() == "2"
    metrics = requests.get(f"{server.url}/metrics").text
    assert 'appliance_model_info{device="CPU",model="red",precision="f32",version="2"} 1.0' in metrics
    assert 'version="1"' not in metrics


def test_a_version_that_cannot_load_leaves_the_old_one_serving(two_versions):
    _, server = two_versions
    headers = {"X-API-Key": "k"}
    assert requests.post(f"{server.url}/models/switch?model=red&version=9").status_code == 401
    failed = requests.post(f"{server.url}/models/switch?model=red&version=9", headers=headers)
    assert failed.status_code == 400 and "version 9" in failed.json()["message"]
    ctx = requests.post(f"{server.url}/analyze_image", data=frame((0, 0, 255)), headers=headers).json()
    assert ctx["models"][0]["version"] == "1" and ctx["result"] is False
    assert 'appliance_model_load_failures_total{model="red"} 1.0' in requests.get(f"{server.url}/metrics").text


def test_the_server_follows_a_pointer_moved_by_the_cli(two_versions):
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    project, server = two_versions
    done = subprocess.run([sys.executable, "-m", "appliance", "models", "switch", str(project), "red", "2"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 8
    version = None
    while time.monotonic() < deadline and version != "2":
        time.sleep(0.3)
        ctx = requests.post(f"{server.url}/analyze_image", data=frame((0, 0, 255)), headers={"X-API-Key": "k"}).json()
        version = ctx["models"][0]["version"]
    assert version == "2"


def test_a_corrupt_model_stops_the_start_with_exit_78(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    project = write_project(tmp_path / "p", FLOW)
    save_red_detector(project / "models")
    with open(project / "models" / "red" / "1" / "model.bin", "ab") as weights:
        weights.write(b"\0")
    result = subprocess.run([sys.executable, "-m", "appliance", "serve", str(project), "--port", "0"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 78
    assert "model.bin sha256 mismatch (expected" in result.stderr
