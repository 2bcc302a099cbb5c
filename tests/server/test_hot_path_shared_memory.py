"""The shared-memory path uses its frame buffers again (appliance/frames.py `FrameBuffers`), and never one whose
frame is still in use: not the frame a Code hook keeps, not the one the server keeps for GET /last_image while the
next frame is inspected. Real server on 127.0.0.1, real blocks made as the PEKAT SDK makes them (RELIABILITY 6).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from appliance.frames import FrameBuffers
from tests.conftest import write_project

WIDTH, HEIGHT = 320, 240

# Keeps the first frame it is given for the life of the process, and reports that kept frame's pixel sum and the
# sum of the frame it was given now.
KEEPER = """
import numpy as np

kept = []


def main(context):
    if not kept:
        kept.append(context["image"])
    context["kept_sum"] = int(kept[0].astype(np.int64).sum())
    context["frame_sum"] = int(context["image"].astype(np.int64).sum())
"""
# With `data` "wait:PATH": creates PATH, then waits a second, so that a test can act while the frame is inspected.
WAITER = """
import time


def main(context):
    if context["data"].startswith("wait:"):
        open(context["data"][len("wait:"):], "w").close()
        time.sleep(1.0)
"""


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)


@pytest.fixture
def block() -> Iterator[shared_memory.SharedMemory]:
    segment = shared_memory.SharedMemory(create=True, size=WIDTH * HEIGHT * 3)
    yield segment
    segment.close()
    segment.unlink()


def put(segment: shared_memory.SharedMemory, image: np.ndarray) -> None:
    np.ndarray(image.shape, np.uint8, buffer=segment.buf)[:] = image


def analyse(url: str, segment: shared_memory.SharedMemory, data: str = "") -> dict:
    answer = requests.post(f"{url}/analyze_image_shared_memory?width={WIDTH}&height={HEIGHT}&name={segment.name}"
                           f"&data={data}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture
def keeper_server(tmp_path: Path, serve_in_process):
    project = write_project(tmp_path / "keeper", {"nodes": {"keep": {"type": "code@1", "module": "keeper"}}},
                            hooks={"keeper": KEEPER})
    return serve_in_process(project, workers=2)


@pytest.fixture
def waiting_server(tmp_path: Path, serve_in_process):
    """Two branches from the frame: a crop, and a Code hook that can be made to wait. After the branches the
    context's image is the frame as read (PROTOCOL.md 7), a view of the buffer the frame was read into: the
    context the server keeps for /last_image holds that buffer."""
    flow = {"nodes": {"roi": {"type": "crop@1", "x": 10, "y": 10, "width": 100, "height": 80},
                      "wait": {"type": "code@1", "module": "waiter"}}}
    return serve_in_process(write_project(tmp_path / "waiter", flow, hooks={"waiter": WAITER}), workers=2)


def test_a_frame_kept_by_a_code_hook_is_not_overwritten_by_the_frames_after_it(keeper_server, block):
    first = frame(1)
    put(block, first)
    assert analyse(keeper_server.url, block)["kept_sum"] == int(first.astype(np.int64).sum())
    for seed in range(2, 8):
        image = frame(seed)
        put(block, image)
        answer = analyse(keeper_server.url, block)
        assert answer["frame_sum"] == int(image.astype(np.int64).sum())  # this frame was read, not an old one
        assert answer["kept_sum"] == int(first.astype(np.int64).sum())


def test_last_image_shows_the_previous_frame_while_the_next_is_inspected(waiting_server, block, tmp_path):
    """The server keeps the last frame's context for GET /last_image: the next frame must be read into other
    memory, or /last_image would show the new frame's pixels under the old frame's answer."""
    previous, following = frame(11), frame(12)
    put(block, previous)
    analyse(waiting_server.url, block)
    put(block, following)
    marker = tmp_path / "inspecting"
    answers: list[dict] = []
    request = threading.Thread(target=lambda: answers.append(analyse(waiting_server.url, block, f"wait:{marker}")))
    request.start()
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():  # the next frame is read and its flow is running
            assert time.monotonic() < deadline, "the hook never ran"
            time.sleep(0.01)
        shown = requests.get(f"{waiting_server.url}/last_image?response_type=image", timeout=30)
        assert shown.status_code == 200
        assert np.array_equal(cv2.imdecode(np.frombuffer(shown.content, np.uint8), cv2.IMREAD_COLOR), previous)
    finally:
        request.join()
    assert answers[0]["result"] is True
    shown = requests.get(f"{waiting_server.url}/last_image?response_type=image", timeout=30)
    assert np.array_equal(cv2.imdecode(np.frombuffer(shown.content, np.uint8), cv2.IMREAD_COLOR), following)


def test_a_buffer_is_used_again_only_when_nothing_refers_to_its_frame():
    buffers = FrameBuffers(keep=2, largest=1 << 20)
    first = buffers.take(4096)
    address = first.ctypes.data
    assert address % 4096 == 0
    crop = first.reshape(64, 64)[10:20, 10:20]  # a node's crop: a view of the same memory
    del first
    second = buffers.take(4096)
    assert second.ctypes.data != address  # the crop still shows the first frame
    held = memoryview(crop)
    del crop
    assert buffers.take(4096).ctypes.data not in (address, second.ctypes.data)  # pool full: new memory
    del held
    assert buffers.take(4096).ctypes.data == address  # nothing refers to the first frame any more
    assert buffers.take(8192).ctypes.data != address  # another size never gets a smaller buffer
