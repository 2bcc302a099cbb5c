"""Teaching's choices and bookkeeping: the trainer a request may ask for, what a draft trained on too few images to
hold any out says of its scores, and the region cut a saved version keeps when the operator moves the threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import pytest
import yaml

from appliance.console.teach import MODES, TEACH_MODE, save_version, train_draft
from appliance.training.demo_parts import good_parts
from appliance.training.modes import ANOMALY_MODES, DEFAULT_MODE
from tests.conftest import Server, start_server
from tests.console.conftest import ConsoleClient, backbone_path, console_project


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    running = start_server(console_project(tmp_path_factory.mktemp("console") / "line"))
    yield running
    running.stop()


def test_the_page_offers_the_trainers_modes_and_starts_on_the_default(server: Server) -> None:
    assert list(MODES) == ["fast", "thorough", "bank"] and set(MODES) == set(ANOMALY_MODES)
    state = ConsoleClient(server).get("teach").json()
    assert TEACH_MODE == DEFAULT_MODE == state["mode"] == "fast"
    assert [entry["mode"] for entry in state["modes"]] == list(MODES)
    assert state["stages"] == ["features", "discriminator", "threshold", "save", "scores"]


@pytest.mark.parametrize("mode", ["quick", ["fast"], 1])
def test_an_unknown_mode_is_refused_with_the_known_ones(server: Server, mode: Any) -> None:
    client = ConsoleClient(server)
    answer = client.post("teach/train", {"mode": mode})
    assert answer.status_code == 400
    shown = '"quick"' if mode == "quick" else ('["fast"]' if mode == ["fast"] else "1")
    assert answer.json()["message"] == f"mode must be one of fast, thorough, bank, got {shown}"
    assert client.get("teach").json()["status"] == "idle"  # nothing started


@pytest.fixture(scope="module")
def few_images_draft(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A draft of 4 good demo parts trained by the default trainer: fewer than the 6 it needs to hold any out."""
    draft = tmp_path_factory.mktemp("teach")
    (draft / "good").mkdir()
    for index, frame in enumerate(good_parts(4, seed=5)):
        assert cv2.imwrite(str(draft / "good" / f"part_{index}.png"), frame)
    return draft, train_draft(draft, 256, backbone_path())


def test_too_few_images_to_hold_out_are_all_trained_on_and_the_page_says_so(
        few_images_draft: tuple[Path, dict[str, Any]]) -> None:
    _, result = few_images_draft
    assert result["mode"] == "fast" and result["metrics"]["calibration_images"] == 0
    assert [entry["unseen"] for entry in result["scores"]["good"]] == [False] * 4
    assert len(result["scores"]["fitted"]) == 32  # the 4 training images in their 8 rotations x flips
    assert result["fitted_on"].startswith("the 4 training images in their 8 rotations x flips (32 scores): too few "
                                          "images to hold any out (6 are needed)")
    # The threshold is never below what those scores reach.
    assert max(result["scores"]["fitted"]) < result["threshold"]


def test_a_moved_threshold_keeps_the_discriminators_region_cut(few_images_draft: tuple[Path, dict[str, Any]],
                                                               tmp_path: Path) -> None:
    draft, result = few_images_draft
    region_cut = result["pixel_threshold"]
    assert region_cut < result["threshold"]  # from the good pixels, not the image threshold
    raised = result["threshold"] * 1.5
    version = save_version(draft, result, tmp_path / "parts", raised, "s1")
    spec = yaml.safe_load((tmp_path / "parts" / version / "spec.yaml").read_text())
    assert spec["threshold"] == pytest.approx(raised) and spec["pixel_threshold"] == pytest.approx(region_cut)
    assert spec["training"]["metrics"]["threshold_rule"] == "chosen in the console by session s1"
    # Below the cut, the cut follows the threshold down: a flagged image always shows its peak as a region.
    lowered = region_cut / 2
    version = save_version(draft, result, tmp_path / "parts", lowered, "s1")
    spec = yaml.safe_load((tmp_path / "parts" / version / "spec.yaml").read_text())
    assert spec["pixel_threshold"] == pytest.approx(lowered)
    # Regions cut at the image threshold (the bank's good-only rule) keep following it.
    bank_rule = {**result, "pixel_threshold": result["threshold"]}
    version = save_version(draft, bank_rule, tmp_path / "parts", raised, "s1")
    spec = yaml.safe_load((tmp_path / "parts" / version / "spec.yaml").read_text())
    assert spec["pixel_threshold"] == pytest.approx(raised)
