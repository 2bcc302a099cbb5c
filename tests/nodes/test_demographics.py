"""demographics@1 after faces@1 with the real BlazeFace, age and gender models (`make models`), in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from appliance import frames
from appliance.errors import ConfigError
from appliance.face_chips import face_chip
from appliance.project import Project
from tests.conftest import REPO, write_project

ASTRONAUT = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)  # one face, Eileen Collins, a woman in her late 30s
FLOW = {"nodes": {"faces": {"type": "faces@1", "model": "face_short", "mode": "none", "next": ["who"]},
                  "who": {"type": "demographics@1"}}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    folder = tmp_path_factory.mktemp("demographics")
    loaded = Project.load(write_project(folder / "p", FLOW, models_dir=str(REPO / "models"),
                                        cache_dir=str(folder / "cache")))
    loaded.prepare()
    yield loaded
    loaded.close()


def inspect(project: Project, image: np.ndarray) -> dict:
    ctx = project.inspect(frames.Frame(image, "test"), "")
    assert ctx["errors"] == [], ctx["errors"]
    return ctx


def test_the_astronaut_is_one_woman_of_a_plausible_age(project: Project) -> None:
    ctx = inspect(project, ASTRONAUT)
    (face,) = ctx["faces"]
    assert face["gender"] == "female" and 0.5 < face["gender_score"] <= 1
    assert 20 <= face["age"] <= 60 and 0 < face["age_confidence"] <= 1
    assert face["box"] == [ctx["detectedRectangles"][0][key] for key in ("x", "y", "width", "height")]
    assert [m["model"] for m in ctx["models"]] == ["face_short", "age", "gender"]
    assert {m["node"] for m in ctx["models"][1:]} == {"who"}


@pytest.mark.parametrize("angle", [-20, 20])
def test_a_tilted_head_is_aligned_before_the_networks_see_it(project: Project, angle: float) -> None:
    turn = cv2.getRotationMatrix2D((256, 256), angle, 1)
    (face,) = inspect(project, cv2.warpAffine(ASTRONAUT, turn, (512, 512)))["faces"]
    assert face["gender"] == "female" and 20 <= face["age"] <= 60


def test_a_picture_without_a_face_gives_no_entries(project: Project) -> None:
    ctx = inspect(project, cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))
    assert ctx["faces"] == [] and [m["model"] for m in ctx["models"]] == ["face_short", "age", "gender"]


def test_openvino_agrees_with_onnxruntime_in_f32(project: Project) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    (face,) = inspect(project, ASTRONAUT)["faces"]
    for slot in project.runtime.slots.values():
        loaded = slot.current
        assert loaded is not None
        if loaded.name not in ("age", "gender"):
            continue
        assert loaded.precision == "f32"  # the spec's `precision`: this CPU would run bf16 (1.3e-2 off for age)
        chip = face_chip(ASTRONAUT, np.array(face["keypoints"]), loaded.input_size[0], 0.2)
        ours = loaded.infer(chip[None])["probabilities"]
        session = onnxruntime.InferenceSession(str(REPO / "models" / loaded.name / "1" / "model.onnx"),
                                               providers=["CPUExecutionProvider"])
        rgb = cv2.cvtColor(chip, cv2.COLOR_BGR2RGB).astype(np.float32)
        tensor = ((rgb - np.float32([122.782, 117.001, 104.298])) / 256).transpose(2, 0, 1)[None]
        (reference,) = session.run(None, {"images": np.ascontiguousarray(tensor, np.float32)})
        assert np.abs(ours - reference).max() < 1e-4, loaded.name


def test_check_refuses_a_model_of_another_task(tmp_path: Path) -> None:
    flow = {"nodes": {"faces": {**FLOW["nodes"]["faces"]}, "who": {"type": "demographics@1", "age_model": "gender",
                                                                  "gender_model": "face_full"}}}
    with pytest.raises(ConfigError) as raised:
        Project.load(write_project(tmp_path / "p", flow, models_dir=str(REPO / "models")))
    assert "model 'gender' is not an age model" in str(raised.value)
    assert "model 'face_full' is a faces model, not a demographics model" in str(raised.value)
