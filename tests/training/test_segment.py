"""On-device surface segmentation: the surface-defects demo trained as `make demo` does, served by segment@1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import yaml

from appliance.training import TrainingError
from appliance.training.cli import segment_main as main
from appliance.training.defects import KINDS
from appliance.training.demo_parts import good_parts
from appliance.training.demo_setup import SURFACE_CHECK, SURFACE_MODEL, set_up_surface
from appliance.training.segment import train_segmenter
from tests.conftest import REPO, Server, start_server


@pytest.fixture(scope="module")
def surface_copy(tmp_path_factory: pytest.TempPathFactory, backbone_xml: Path) -> Path:
    project = tmp_path_factory.mktemp("surface") / "surface-defects"
    project.mkdir()
    config = yaml.safe_load((REPO / "projects/surface-defects/project.yaml").read_text())
    config["flow"] = str(REPO / "projects/surface-defects" / config["flow"])
    (project / "project.yaml").write_text(yaml.safe_dump(config))
    assert set_up_surface(project, backbone=backbone_xml) == 0
    return project


@pytest.fixture(scope="module")
def surface(surface_copy: Path) -> Iterator[Server]:
    server = start_server(surface_copy)
    yield server
    server.stop()


def test_training_stores_a_segment_model_with_its_labels_and_validation(surface_copy: Path) -> None:
    spec = yaml.safe_load((surface_copy / "models" / SURFACE_MODEL / "1" / "spec.yaml").read_text())
    assert spec["task"] == "segment"
    assert [label["name"] for label in spec["labels"]] == ["background", *KINDS]
    validation = spec["training"]["metrics"]["validation"]
    assert validation["iou"]["background"] > 0.95
    assert validation["mean_defect_iou"] > 0.3  # measured 0.43; scratches are the weak kind (0.15)


def test_each_held_out_defect_is_found_and_labelled_with_its_kind(surface: Server, surface_copy: Path) -> None:
    paths = sorted((surface_copy / "images" / "check").glob("part_*.png"))
    assert len(paths) == SURFACE_CHECK
    for path in paths:
        ctx = requests.post(f"{surface.url}/analyze_image", data=path.read_bytes()).json()
        mask = cv2.imread(str(surface_copy / "images" / "check_masks" / path.name), cv2.IMREAD_GRAYSCALE)
        kind = KINDS[int(mask.max()) - 1]
        ys, xs = np.nonzero(mask)
        largest = max(ctx["detectedRectangles"], key=lambda r: r["area"])
        assert ctx["result"] is False and largest["classNames"][0]["label"] == kind, (path.name, largest)
        assert largest["x"] <= xs.mean() <= largest["x"] + largest["width"]
        assert largest["y"] <= ys.mean() <= largest["y"] + largest["height"]
        assert largest["source"]["type"] == "SURFACE"


def test_good_parts_pass(surface: Server) -> None:
    for frame in good_parts(10, seed=11):
        ctx = requests.post(f"{surface.url}/analyze_image", data=cv2.imencode(".png", frame)[1].tobytes()).json()
        assert ctx["result"] is True and ctx["detectedRectangles"] == [], ctx["detectedRectangles"]


def test_masks_must_match_the_labels(backbone_xml: Path, tmp_path: Path) -> None:
    image = good_parts(1)[0]
    with pytest.raises(TrainingError, match="a mask holds class 3; labels are 1..2"):
        train_segmenter([image], [np.full(image.shape[:2], 3, np.uint8)], ["a", "b"], backbone_xml)
    with pytest.raises(TrainingError, match="no mask marks any pixel"):
        train_segmenter([image], [np.zeros(image.shape[:2], np.uint8)], ["a"], backbone_xml)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), image)
    assert main(["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--labels", "x",
                 "--out", str(tmp_path / "out"), "--backbone", str(backbone_xml)]) == 1
