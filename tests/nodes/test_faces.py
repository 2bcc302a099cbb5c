"""faces@1 through a real server with the real BlazeFace models: the pixels of the anonymised image that comes
back (response_type=image), per mode, and the demo project projects/faces-anonymise."""

from __future__ import annotations

import json
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import requests
from skimage import data

from tests.conftest import REPO, Server, start_server, write_project

ASTRONAUT = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # 512 x 512; one face near (179, 82)-(271, 175)
# The crop keeps the face at the same scale and place in the letterboxed model input (64 rows off, 64 rows of
# border), so BlazeFace sees the face as without it: only the mapping back to the frame is new.
ROI = {"type": "crop@1", "x": 0, "y": 64, "width": 512, "height": 384}
MODES = {
    "pixel": {"faces": {"type": "faces@1", "model": "face_short", "mode": "pixel", "block": 12}},
    "fill": {"faces": {"type": "faces@1", "model": "face_short", "mode": "fill", "color": "#3366cc",
                       "margin": 0}},
    "black": {"faces": {"type": "faces@1", "model": "face_full", "mode": "black", "margin": 0.2}},
    # Through a crop: the answer is the cropped image, the rectangle is in frame pixels.
    "box": {"roi": {**ROI, "next": ["faces"]},
            "faces": {"type": "faces@1", "model": "face_short", "mode": "box", "thickness": 3}},
    "none": {"faces": {"type": "faces@1", "model": "face_full", "mode": "none", "margin": 0}},
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    folder = tmp_path_factory.mktemp("faces")
    started: dict[str, Server] = {}
    try:
        for mode, nodes in MODES.items():
            project = write_project(folder / mode, {"nodes": nodes}, models_dir=str(REPO / "models"),
                                    cache_dir=str(folder / "cache"))
            started[mode] = start_server(project)
        yield started
    finally:
        for server in started.values():
            server.stop()


def anonymised(server: Server, image: np.ndarray = ASTRONAUT) -> tuple[np.ndarray, dict]:
    """The image and the context of one answer (context_in_body: the image, then the JSON)."""
    response = requests.post(f"{server.url}/analyze_image?response_type=image&context_in_body",
                             data=cv2.imencode(".png", image)[1].tobytes())
    assert response.status_code == 200, response.text
    length = int(response.headers["ImageLen"])
    picture = cv2.imdecode(np.frombuffer(response.content[:length], np.uint8), cv2.IMREAD_UNCHANGED)
    ctx = json.loads(response.content[length:])
    assert ctx["errors"] == [], ctx["errors"]
    return picture, ctx


def the_face(ctx: dict) -> tuple[int, int, int, int]:
    """The one face rectangle as x0, y0, x1, y1 (exclusive) in frame pixels."""
    (rectangle,) = ctx["detectedRectangles"]
    assert rectangle["classNames"][0]["label"] == "face" and rectangle["source"]["type"] == "DETECTION"
    assert rectangle["confidence"] > 0.85
    x, y = rectangle["x"], rectangle["y"]
    return x, y, x + rectangle["width"], y + rectangle["height"]


def outside(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.ones(image.shape[:2], bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = False
    return mask


def test_pixel_mode_makes_the_face_blocky_and_leaves_the_rest(servers: dict[str, Server]) -> None:
    picture, ctx = anonymised(servers["pixel"])
    x0, y0, x1, y1 = the_face(ctx)
    # BlazeFace's box (about 95 px) grown by the default margin of 10 % on each side.
    assert np.allclose((x0, y0, x1, y1), (169, 71, 283, 185), atol=6)
    assert picture.shape == ASTRONAUT.shape
    assert np.array_equal(picture[outside(picture, (x0, y0, x1, y1))], ASTRONAUT[outside(ASTRONAUT, (x0, y0, x1, y1))])
    face, original = picture[y0:y1, x0:x1].astype(int), ASTRONAUT[y0:y1, x0:x1].astype(int)
    assert np.abs(face - original).mean() > 8  # the eyes, nose and mouth are gone
    # Every 12 x 12 block from the region's corner is one colour, close to the mean of the pixels it hides.
    for top in range(0, face.shape[0] - 11, 12):
        for left in range(0, face.shape[1] - 11, 12):
            block = face[top:top + 12, left:left + 12]
            assert (block == block[0, 0]).all(), (top, left)
            assert np.abs(block[0, 0] - original[top:top + 12, left:left + 12].mean(axis=(0, 1))).max() <= 0.5
    # Neighbouring blocks differ: it is a mosaic, not a flat fill.
    assert len({tuple(face[top, left]) for top in range(0, 96, 12) for left in range(0, 96, 12)}) > 30


def test_fill_mode_paints_the_box_in_the_colour(servers: dict[str, Server]) -> None:
    picture, ctx = anonymised(servers["fill"])
    x0, y0, x1, y1 = the_face(ctx)
    # No margin: BlazeFace's own box (MODELS.md: 0.92 at (179, 82)-(271, 175)).
    assert np.allclose((x0, y0, x1, y1), (179, 82, 271, 175), atol=4)
    assert (picture[y0:y1, x0:x1] == (0xcc, 0x66, 0x33)).all()  # #3366cc in BGR
    assert np.array_equal(picture[outside(picture, (x0, y0, x1, y1))], ASTRONAUT[outside(ASTRONAUT, (x0, y0, x1, y1))])


def test_black_mode_keeps_only_the_faces(servers: dict[str, Server]) -> None:
    picture, ctx = anonymised(servers["black"])
    x0, y0, x1, y1 = the_face(ctx)
    # The full-range box (172, 66)-(279, 173), 107 px wide, grown by 20 % on each side.
    assert np.allclose((x0, y0, x1, y1), (151, 45, 300, 194), atol=6)
    assert (picture[outside(picture, (x0, y0, x1, y1))] == 0).all()
    assert np.array_equal(picture[y0:y1, x0:x1], ASTRONAUT[y0:y1, x0:x1])


def test_box_mode_frames_the_face_in_the_cropped_image(servers: dict[str, Server]) -> None:
    picture, ctx = anonymised(servers["box"])
    assert picture.shape == (ROI["height"], ROI["width"], 3)
    x0, y0, x1, y1 = the_face(ctx)
    assert np.allclose((x0, y0, x1, y1), (169, 71, 283, 185), atol=6)  # frame pixels, as without the crop
    cropped = ASTRONAUT[ROI["y"]:ROI["y"] + ROI["height"], ROI["x"]:ROI["x"] + ROI["width"]]
    left, top, right, bottom = x0 - ROI["x"], y0 - ROI["y"], x1 - ROI["x"], y1 - ROI["y"]
    green = (0, 255, 0)  # the label's colour in the model's spec
    frame = np.zeros(picture.shape[:2], bool)
    frame[top:bottom, left:right] = True
    frame[top + 3:bottom - 3, left + 3:right - 3] = False  # a line 3 px wide just inside the box
    assert (picture[frame] == green).all()
    assert np.array_equal(picture[~frame], cropped[~frame])


def test_a_frame_without_faces_comes_back_unchanged(servers: dict[str, Server]) -> None:
    coffee = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)
    picture, ctx = anonymised(servers["pixel"], coffee)
    assert ctx["detectedRectangles"] == [] and np.array_equal(picture, coffee)


def test_none_mode_leaves_the_image_and_lists_the_face_with_its_keypoints(servers: dict[str, Server]) -> None:
    picture, ctx = anonymised(servers["none"])
    assert picture.tobytes() == ASTRONAUT.tobytes()
    x0, y0, x1, y1 = the_face(ctx)
    (face,) = ctx["faces"]
    assert face["node"] == "faces" and face["box"] == [x0, y0, x1 - x0, y1 - y0] and face["score"] > 0.85
    right_eye, left_eye, nose, mouth, right_ear, left_ear = face["keypoints"]
    # The person's right eye is on the left of the picture; both eyes in the box's upper half, the mouth under
    # the nose, the ears outside the eyes.
    assert x0 < right_eye[0] < left_eye[0] < x1 and y0 < right_eye[1] < (y0 + y1) / 2 and left_eye[1] < (y0 + y1) / 2
    assert right_eye[1] < nose[1] < mouth[1] < y1
    assert right_ear[0] < right_eye[0] and left_ear[0] > left_eye[0]


def test_keypoints_are_in_frame_pixels_through_a_crop(servers: dict[str, Server]) -> None:
    _, plain = anonymised(servers["pixel"])
    _, cropped = anonymised(servers["box"])
    (a,), (b,) = plain["faces"], cropped["faces"]
    # The crop moves the face in the letterboxed input by whole model pixels only; 3-4 px of the frame apart.
    assert np.allclose(a["box"], b["box"], atol=6)
    assert np.allclose(a["keypoints"], b["keypoints"], atol=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(REPO / "projects" / "faces-anonymise", log_file=tmp_path_factory.mktemp("demo") / "log")
    yield server
    server.stop()


def test_demo_project_pixelates_the_astronaut(demo: Server) -> None:
    picture, ctx = anonymised(demo)
    x0, y0, x1, y1 = the_face(ctx)
    assert ctx["result"] is True
    assert ctx["models"] == [{"node": "faces", "model": "face_full", "version": "1", "device": "CPU"}]
    assert np.allclose((x0, y0, x1, y1), (161, 55, 290, 184), atol=6)  # (172, 66)-(279, 173) + 10 %
    assert np.array_equal(picture[outside(picture, (x0, y0, x1, y1))], ASTRONAUT[outside(ASTRONAUT, (x0, y0, x1, y1))])
    face = picture[y0:y1, x0:x1]
    assert np.abs(face.astype(int) - ASTRONAUT[y0:y1, x0:x1]).mean() > 8
    # Default block: an eighth of the region's width.
    block = round((x1 - x0) / 8)
    assert (face[:block, :block] == face[0, 0]).all()
    # The JSON answer lists the face too; a request may set the threshold (the flow allows it).
    plain = requests.post(f"{demo.url}/analyze_image?threshold=0.8", data=cv2.imencode(".png", ASTRONAUT)[1].tobytes())
    assert plain.status_code == 200 and len(plain.json()["detectedRectangles"]) == 1
    strict = requests.post(f"{demo.url}/analyze_image?threshold=0.95", data=cv2.imencode(".png", ASTRONAUT)[1].tobytes())
    assert strict.json()["detectedRectangles"] == []
