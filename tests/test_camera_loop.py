"""examples/camera_loop.py against a real server: frames from a folder and a video file, in every format."""

from __future__ import annotations

import subprocess
import sys

import cv2
import pytest

from tests.conftest import REPO
from tests.server.test_protocol import part_image


@pytest.mark.parametrize("kind", ["bgr", "bayer", "jpeg"])
def test_camera_loop_sends_a_folder_and_prints_verdicts(spots_server, tmp_path, kind):
    cv2.imwrite(str(tmp_path / "a_good.png"), part_image(False))
    cv2.imwrite(str(tmp_path / "b_spot.png"), part_image(True))
    result = subprocess.run([sys.executable, str(REPO / "examples" / "camera_loop.py"), "--source", str(tmp_path),
                             "--url", spots_server.url, "--as", kind], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("a_good.png: OK")
    assert lines[1].startswith("b_spot.png: NG") and "spot@" in lines[1]
    assert "done: 1 OK, 1 NG, 0 errors" in result.stderr


def test_camera_loop_reads_a_video_file_at_a_rate(spots_server, tmp_path):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (1920, 1080))
    for index in range(4):
        writer.write(part_image(index % 2 == 1))
    writer.release()
    result = subprocess.run([sys.executable, str(REPO / "examples" / "camera_loop.py"), "--source", str(video),
                             "--url", spots_server.url, "--as", "jpeg", "--rate", "20", "--max-frames", "4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    verdicts = [line.split(": ")[1][:2] for line in result.stdout.splitlines()]
    assert verdicts == ["OK", "NG", "OK", "NG"]


def test_camera_loop_points_a_camera_to_the_appliances_own_sources():
    # Cameras and streams are the appliance's to read (project.yaml `sources:`), not this client's.
    result = subprocess.run([sys.executable, str(REPO / "examples" / "camera_loop.py"), "--source", "/dev/video0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("/dev/video0 is a camera or a stream: the appliance reads it itself when "
                                          "project.yaml lists it under `sources:` (docs/sources.md); this client "
                                          "sends image folders and video files")
