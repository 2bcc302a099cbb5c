"""PEKAT's wire protocol on 127.0.0.1 (PROTOCOL.md 1-6): the handlers served in this process, the launch markers,
shared memory from another process and the stop through `appliance serve` processes."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from multiprocessing import shared_memory

import cv2
import numpy as np
import pytest
import requests

from appliance.frames import mosaic_rggb
from tests.conftest import REPO, InProcessServer, slow_project, start_in_process, write_project

SPOT_FLOW = (REPO / "flows" / "demo.yaml").read_text()


@pytest.fixture(scope="module")
def spots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """projects/dark-spots served in this process (the process of `spots_server` is for what only it shows)."""
    server = start_in_process(REPO / "projects" / "dark-spots",
                              log_file=tmp_path_factory.mktemp("spots") / "server.log")
    yield server
    server.stop()


def part_image(spot: bool, width: int = 1920, height: int = 1080) -> np.ndarray:
    """A bright part; with `spot`, one dark 40x30 spot at x=900, y=500 (inside the demo ROI)."""
    image = np.full((height, width, 3), 210, np.uint8)
    if spot:
        image[500:530, 900:940] = 20
    return image


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def test_ping_version_and_health(spots, http):
    assert http.get(f"{spots.url}/ping").text == "pong"
    assert http.head(f"{spots.url}/ping").status_code == 200
    from packaging.version import Version
    version = Version(http.get(f"{spots.url}/version").text)
    assert version >= Version("3.18.0") and version.local.startswith("appliance.")
    assert http.get(f"{spots.url}/health/live").status_code == 200
    ready = http.get(f"{spots.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_launch_markers_are_printed_in_order(spots_server):
    assert spots_server.stdout_lines[:2] == ["__SERVER_RUNNING__", "STOP_INIT_MODEL"]


@pytest.mark.parametrize("spot, verdict", [(False, True), (True, False)])
def test_analyze_image_gives_the_verdict_and_the_rectangle_in_frame_pixels(spots, http, spot, verdict):
    response = http.post(f"{spots.url}/analyze_image?response_type=context&data=lot-17", data=png(part_image(spot)))
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    ctx = response.json()
    assert ctx["result"] is verdict
    assert ctx["data"] == "lot-17"
    assert ctx["imageShape"] == {"height": 1080, "width": 1920}
    for key in ("processing", "errors", "processingTime", "completeTime", "production_mode", "detectedRectangles"):
        assert key in ctx
    assert "image" not in ctx and "heatmaps" not in ctx
    if spot:
        (rect,) = ctx["detectedRectangles"]
        assert (rect["x"], rect["y"], rect["width"], rect["height"]) == (900, 500, 40, 30)
        assert rect["classNames"][0] == {"id": 1, "label": "spot", "confidence": 100, "color": "#ff0000"}
        assert rect["source"]["type"] == "CODE"
        assert rect["id"] == 1
    else:
        assert ctx["detectedRectangles"] == []


def test_multipart_upload_like_curl_dash_f(spots, http):
    response = http.post(f"{spots.url}/analyze_image", files={"file": ("part.jpg", jpeg(part_image(True)))})
    assert response.status_code == 200 and response.json()["result"] is False


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_raw_frames_gray_bgr_and_bgra(spots, http, channels):
    image = part_image(True)
    if channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif channels == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2BGRA)
    response = http.post(f"{spots.url}/analyze_raw_image?width=1920&height=1080", data=image.tobytes())
    assert response.status_code == 200, response.text
    assert response.json()["result"] is False


def test_bayer_rg8_frame_is_demosaiced_with_the_right_colours(tmp_path, serve_in_process, http):
    project = write_project(tmp_path / "p", {"nodes": {"c": {"type": "color@1", "to": "bgr"}}})
    server = serve_in_process(project)
    patches = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0), "orange": (0, 128, 255)}
    bgr = np.zeros((64, 256, 3), np.uint8)
    for index, colour in enumerate(patches.values()):
        bgr[:, index * 64:(index + 1) * 64] = colour
    response = http.post(f"{server.url}/analyze_raw_image?width=256&height=64&bayer&response_type=image",
                         data=mosaic_rggb(bgr).tobytes())
    assert response.status_code == 200
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    for index, (name, colour) in enumerate(patches.items()):
        centre = image[32, index * 64 + 32].astype(int)
        assert np.abs(centre - colour).max() <= 8, f"{name} came back as {centre.tolist()}"


@pytest.mark.parametrize("response_type", ["image", "annotated_image", "heatmap"])
@pytest.mark.parametrize("in_body", [True, False])
def test_image_responses_in_both_context_layouts(spots, http, response_type, in_body):
    url = f"{spots.url}/analyze_image?response_type={response_type}&data=x"
    if in_body:
        url += "&context_in_body"
    response = http.post(url, data=png(part_image(True)))
    assert response.status_code == 200
    if in_body:
        length = int(response.headers["ImageLen"])
        image_bytes, ctx = response.content[:length], json.loads(response.content[length:])
        assert "ContextBase64utf" not in response.headers
    else:
        image_bytes = response.content
        ctx = json.loads(base64.b64decode(response.headers["ContextBase64utf"], validate=True))
    assert ctx["result"] is False and ctx["data"] == "x"
    image = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    # The demo flow crops to its 1280x800 region of interest; every image answer has that size.
    assert image.shape == (800, 1280, 3)
    if response_type == "image":
        assert image[380, 600].tolist() == [20, 20, 20]  # the spot, at (900-320, 500-140) + 20 inside
        assert image[100, 100].tolist() == [210, 210, 210]
    elif response_type == "annotated_image":
        # The rectangle is drawn in its label colour #ff0000 (red in BGR) around the spot.
        assert image[360, 600].tolist() == [0, 0, 255]
    else:
        assert image.max() == 0  # no heat map in this flow: black


def test_jpeg_answer_when_asked(spots, http):
    response = http.post(f"{spots.url}/analyze_image?response_type=image&image_format=jpeg&context_in_body",
                         data=png(part_image(False)))
    length = int(response.headers["ImageLen"])
    assert response.content[:3] == b"\xff\xd8\xff"
    assert json.loads(response.content[length:])["result"] is True


def test_shared_memory_frame_from_another_process(spots_server, http):
    image = part_image(True)
    block = shared_memory.SharedMemory(create=True, size=image.nbytes)
    try:
        np.ndarray(image.shape, np.uint8, buffer=block.buf)[:] = image
        response = http.post(f"{spots_server.url}/analyze_image_shared_memory?width=1920&height=1080&name={block.name}")
        assert response.status_code == 200, response.text
        assert response.json()["result"] is False
        # The server never unlinks the client's block.
        shared_memory.SharedMemory(name=block.name).close()
    finally:
        block.close()
        block.unlink()


def test_api_key_from_query_header_or_bearer(tmp_path, serve_in_process, http):
    project = write_project(tmp_path / "p", {"nodes": {"c": {"type": "flip@1", "direction": "both"}}},
                            api_key="s3cret-key")
    server = serve_in_process(project)
    body = png(part_image(False, 64, 48))
    url = f"{server.url}/analyze_image"
    assert http.post(url, data=body).json() == {"status": 401, "message": "missing API key", "data": None}
    assert http.post(url + "?api_key=wrong", data=body).status_code == 401
    assert http.post(url + "?api_key=s3cret-key", data=body).json()["result"] is True
    assert http.post(url, data=body, headers={"X-API-Key": "s3cret-key"}).status_code == 200
    assert http.post(url, data=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    # Every key given must match.
    mixed = http.post(url + "?api_key=s3cret-key", data=body, headers={"X-API-Key": "other"})
    assert mixed.status_code == 401 and mixed.json()["message"] == "wrong API key"
    assert mixed.headers["WWW-Authenticate"] == 'Bearer realm="appliance"'
    # Ping, version and health stay open.
    for path in ("/ping", "/version", "/health/live", "/health/ready", "/metrics"):
        assert http.get(server.url + path).status_code == 200
    log = server.log_text()
    assert "s3cret-key" not in log and "api_key=***" in log  # the request lines are there, redacted


def test_a_project_without_a_key_needs_none(spots, http):
    assert http.post(f"{spots.url}/analyze_image", data=png(part_image(False))).status_code == 200


def test_stop_with_the_right_key_drains_and_exits_zero(tmp_path, serve, http):
    project = write_project(tmp_path / "p", {"nodes": {"c": {"type": "flip@1", "direction": "both"}}})
    server = serve(project, "--stop-key", "abcdefghij")
    assert http.get(f"{server.url}/stop?key=wrong").status_code == 401
    response = http.get(f"{server.url}/stop?key=abcdefghij")
    assert response.json() == {"status": 200, "message": "stopping", "data": None}
    assert server.process.wait(10) == 0


def test_stop_without_a_stop_key_is_forbidden(spots, http):
    response = http.get(f"{spots.url}/stop?key=abc")
    assert response.status_code == 403
    assert response.json()["message"] == "stop is disabled for this project"


def test_the_server_keeps_answering_ping_while_frames_are_processed(tmp_path, serve):
    project = slow_project(tmp_path / "p", 0.5)
    server = serve(project)
    import concurrent.futures
    import time

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        body = png(part_image(False, 64, 48))
        slow = [pool.submit(requests.post, f"{server.url}/analyze_image", data=body) for _ in range(3)]
        time.sleep(0.1)
        started = time.perf_counter()
        assert requests.get(f"{server.url}/ping", timeout=5).text == "pong"
        assert time.perf_counter() - started < 0.1
        assert all(f.result().status_code == 200 for f in slow)


def test_last_image_answers_the_last_frame_again(tmp_path, serve_in_process, http):
    project = write_project(tmp_path / "p", {"nodes": {"f": {"type": "flip@1", "direction": "horizontal"}}},
                            api_key="k")
    server = serve_in_process(project)
    assert http.get(f"{server.url}/last_image?api_key=k").json() == {
        "status": 404, "message": "no frame has been analysed yet", "data": None}
    image = part_image(True, 64, 48)
    http.post(f"{server.url}/analyze_image?api_key=k&data=first", data=png(image))
    assert http.get(f"{server.url}/last_image").status_code == 401
    again = http.get(f"{server.url}/last_image?api_key=k&response_type=image&context_in_body")
    length = int(again.headers["ImageLen"])
    flipped = cv2.imdecode(np.frombuffer(again.content[:length], np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(flipped, image[:, ::-1])
    assert json.loads(again.content[length:])["data"] == "first"
