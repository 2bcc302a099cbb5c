"""classify@1 on Yahoo's open_nsfw (`nsfw` from `make models`) through flows/nsfw.yaml, in-process."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import yaml
from skimage import data

from appliance import frames
from appliance.project import Project
from tests.conftest import REPO, write_project

PICTURES = {"astronaut": data.astronaut, "coffee": data.coffee}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    folder = tmp_path_factory.mktemp("nsfw")
    flow = yaml.safe_load((REPO / "flows" / "nsfw.yaml").read_text())
    # `device` on the node: compiled without the profile's properties, so only the model's spec pins f32.
    flow["nodes"]["nsfw"]["device"] = "CPU"
    loaded = Project.load(write_project(folder / "p", flow, models_dir=str(REPO / "models"),
                                        cache_dir=str(folder / "cache")))
    loaded.prepare()
    yield loaded
    loaded.close()


@pytest.mark.parametrize("name", PICTURES)
def test_safe_pictures_are_sfw(project: Project, name: str) -> None:
    ctx = project.inspect(frames.Frame(cv2.cvtColor(PICTURES[name](), cv2.COLOR_RGB2BGR), "test"), "")
    assert ctx["errors"] == [] and ctx["result"] is True
    (result,) = ctx["classification"]
    assert [p["label_name"] for p in result["predicted"]] == ["sfw"]
    (nsfw,) = result["discarded"]
    assert nsfw["label_name"] == "nsfw" and nsfw["score"] < 0.2
    assert ctx["models"] == [{"node": "nsfw", "model": "nsfw", "version": "1", "device": "CPU"}]


def test_openvino_agrees_with_onnxruntime_in_f32(project: Project) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    (slot,) = project.runtime.slots.values()
    loaded = slot.current
    assert loaded is not None and loaded.precision == "f32"  # the spec's `precision`, not the profile's
    session = onnxruntime.InferenceSession(str(REPO / "models" / "nsfw" / "1" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    for make in PICTURES.values():
        image = cv2.resize(cv2.cvtColor(make(), cv2.COLOR_RGB2BGR), (224, 224), interpolation=cv2.INTER_AREA)
        ours = loaded.infer(image[None])["outputs"]
        (reference,) = session.run(None, {"input:0": image[None].astype(np.float32) - np.float32([104, 117, 123])})
        assert np.abs(ours - reference).max() < 1e-4
