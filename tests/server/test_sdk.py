"""The real pekat-vision-sdk 2.3.3 client against our server: connected, and launching it itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PekatVisionSDK import Instance

from tests.conftest import REPO, free_port
from tests.server.test_protocol import part_image, png

RESPONSE_TYPES = ["context", "image", "annotated_image", "heatmap"]


@pytest.fixture(scope="module")
def spot_png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("images") / "part.png"
    path.write_bytes(png(part_image(True)))
    return str(path)


@pytest.mark.parametrize("response_type", RESPONSE_TYPES)
@pytest.mark.parametrize("context_in_body", [True, False])
def test_sdk_analyses_a_path_bytes_and_a_numpy_frame(spots_server, spot_png, response_type, context_in_body):
    client = Instance(port=spots_server.port, host="127.0.0.1", already_running=True,
                      context_in_body=context_in_body)
    assert client._can_use_shm  # our /version makes the client use shared memory for numpy frames
    frame = part_image(True)
    for image in (spot_png, open(spot_png, "rb").read(), frame):
        result = client.analyze(image, response_type=response_type, data="lot 17")
        ctx = result.context
        assert ctx["result"] is False, ctx
        assert ctx["data"] == "lot 17"
        (rect,) = ctx["detectedRectangles"]
        assert (rect["x"], rect["y"], rect["width"], rect["height"]) == (900, 500, 40, 30)
        if response_type == "context":
            assert result.image_bytes is None
        else:
            decoded = result.get_decoded_image()
            assert decoded.shape == (800, 1280, 3)
            if response_type == "image":
                assert decoded[380, 600].tolist() == [20, 20, 20]


def test_sdk_numpy_frames_of_changing_shape_reuse_and_replace_the_block(spots_server):
    client = Instance(port=spots_server.port, already_running=True)
    for height in (1080, 1080, 1200):
        result = client.analyze(part_image(False, 1920, height))
        assert result.context["imageShape"] == {"height": height, "width": 1920}
        assert result.context["result"] is True


def test_sdk_sees_errors_as_the_context(spots_server):
    client = Instance(port=spots_server.port, already_running=True)
    result = client.analyze(b"not an image at all")
    assert result.context == {"status": 415, "message": "body is not a supported image (JPEG, PNG, BMP, TIFF, WebP)",
                              "data": None}
    assert "result" not in result.context


def pekat_dist(tmp_path) -> str:
    """The launcher a user gets from `appliance pekat-dist DIR` (README), run from another folder."""
    dist = tmp_path / "dist"
    done = subprocess.run([sys.executable, "-m", "appliance", "pekat-dist", str(dist)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return str(dist)


def test_sdk_launches_our_server_through_the_pekat_dist_launcher(tmp_path):
    dist = pekat_dist(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "pekat_package.json").write_text(json.dumps({"name": "launched"}))
    (project / "project.yaml").write_text(f"name: launched\nflow: {REPO}/flows/dark_spots.yaml\n")
    (project / "code").mkdir()
    (project / "code" / "dark_spots.py").write_text((REPO / "projects/dark-spots/code/dark_spots.py").read_text())
    port = free_port()
    client = Instance(project_path=project, dist_path=dist, port=port, wait_for_init_model=True)
    try:
        assert client.process is not None and client.process.poll() is None
        assert client.analyze(part_image(True)).context["result"] is False
    finally:
        client.stop()
    assert client.process.wait(15) == 0
    # Launched by the client, logs go to a file so a full stdout pipe can never block the server.
    assert (project / "logs" / "appliance.log").exists()


def test_sdk_gets_port_is_allocated_when_the_port_is_taken(spots_server, tmp_path):
    from PekatVisionSDK.errors import PortIsAllocatedError

    dist = pekat_dist(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "pekat_package.json").write_text("{}")
    (project / "project.yaml").write_text(f"name: taken\nflow: {REPO}/flows/dark_spots.yaml\n")
    (project / "code").mkdir()
    (project / "code" / "dark_spots.py").write_text((REPO / "projects/dark-spots/code/dark_spots.py").read_text())
    with pytest.raises(PortIsAllocatedError):
        Instance(project_path=project, dist_path=dist, port=spots_server.port, ping=False)
    assert os.path.exists(project)
