"""`appliance train anomaly --mode fast|thorough|bank` (training/cli.py, training/modes.py) on the real backbone."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from appliance.runtime.store import read_current
from appliance.training import TrainingError
from appliance.training.cli import anomaly_main
from appliance.training.modes import ANOMALY_MODES, DEFAULT_MODE, train_by_mode
from appliance.training.surfaces import SURFACES


def write_parts(folder: Path, seeds: range) -> None:
    folder.mkdir(parents=True)
    for seed in seeds:
        assert cv2.imwrite(str(folder / f"part_{seed}.png"), SURFACES["felt"](seed, size=256))


def test_mode_fast_is_the_default_and_stores_the_discriminator(backbone_xml: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    write_parts(tmp_path / "good", range(8))
    out = tmp_path / "store" / "felt"
    code = anomaly_main(["--good", str(tmp_path / "good"), "--out", str(out), "--backbone", str(backbone_xml)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert DEFAULT_MODE == "fast" and "training (fast) on 8 good images" in printed
    # 8 images: 2 held out for the threshold, 6 learnt in their 8 rotations x flips.
    assert "(6 images in 48 views, 2 held out for the threshold)" in printed
    assert read_current(out) == "1"
    training = yaml.safe_load((out / "1" / "spec.yaml").read_text())["training"]
    assert training["recipe"].startswith("discriminator (fast):")
    assert training["metrics"]["mode"] == "fast"
    assert "8 views" in training["metrics"]["threshold_rule"]


def test_mode_bank_stores_the_memory_bank(backbone_xml: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    write_parts(tmp_path / "good", range(3))
    out = tmp_path / "store" / "felt"
    code = anomaly_main(["--good", str(tmp_path / "good"), "--out", str(out), "--backbone", str(backbone_xml),
                         "--mode", "bank", "--size", "64"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "training (bank) on 3 good images" in printed and "augmented images, bank" in printed
    training = yaml.safe_load((out / "1" / "spec.yaml").read_text())["training"]
    assert training["metrics"]["mode"] == "bank" and training["recipe"].startswith("mirror pad 8 px; efficientnet_lite0")


def test_an_unknown_mode_is_refused_with_the_known_ones(backbone_xml: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        anomaly_main(["--good", str(tmp_path), "--out", str(tmp_path / "out"), "--mode", "slow"])
    assert exit_info.value.code == 2
    assert "argument --mode: invalid choice: 'slow' (choose from 'fast', 'thorough', 'bank')" in capsys.readouterr().err
    with pytest.raises(TrainingError, match="unknown mode 'slow'; known: fast, thorough, bank"):
        train_by_mode([np.zeros((64, 64), np.uint8)] * 2, backbone_xml, mode="slow")
    assert ANOMALY_MODES == ("fast", "thorough", "bank")
