"""The model store's one writer (runtime/store.py `publish`): staged, verified, never over an existing version, and
a writer killed at any point leaves the store as it was for the next one (issue 16, item 1)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml

from appliance.runtime.spec import AnomalySpec, read_spec
from appliance.runtime.store import (
    PAUSE_ENV,
    StoreError,
    discard_broken,
    publish,
    publish_folder,
    read_current,
    resolve_version,
    verify_manifest,
)
from appliance.training.demo_parts import good_parts
from tests.training.conftest import backbone_xml  # noqa: F401 - the fixture: the pinned backbone, supplied if absent

REPO = Path(__file__).resolve().parents[2]
SPEC = {"task": "anomaly", "input": {"size": [64, 64]}, "threshold": 1.5}


def snapshot(model_dir: Path) -> dict[str, object]:
    """What a reader of the store sees of a model: `current` and every version's files with their sha256."""
    seen: dict[str, object] = {}
    for entry in sorted(model_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            seen[entry.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(entry.iterdir())}
        else:
            seen[entry.name] = entry.read_text()
    return seen


def hidden(model_dir: Path) -> list[str]:
    return sorted(entry.name for entry in model_dir.iterdir() if entry.name.startswith("."))


def test_publish_writes_a_verified_version_and_switches_current_last(tmp_path: Path) -> None:
    assert publish(tmp_path, "parts", {"model.onnx": b"network"}, SPEC) == "1"
    version_dir = tmp_path / "parts" / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "model.onnx", "spec.yaml"]
    assert read_current(tmp_path / "parts") == "1"
    verify_manifest(version_dir)
    spec = read_spec(version_dir)
    assert isinstance(spec, AnomalySpec) and spec.threshold == 1.5 and spec.outputs.score == "pred_score"
    # The file says what was given, not every default.
    assert yaml.safe_load((version_dir / "spec.yaml").read_text()) == {"task": "anomaly", "input": {"size": [64, 64]},
                                                                        "threshold": 1.5}
    assert oct(version_dir.stat().st_mode & 0o777) == "0o755"  # readable by the service's user
    assert publish(tmp_path, "parts", {"model.onnx": b"network 2"}, SPEC, make_current=False) == "2"
    assert read_current(tmp_path / "parts") == "1"
    assert resolve_version(tmp_path, "parts", "2") == tmp_path / "parts" / "2"
    assert hidden(tmp_path / "parts") == []


def test_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    publish(tmp_path, "parts", {"model.onnx": b"network"}, SPEC, version="7")
    before = snapshot(tmp_path / "parts")
    with pytest.raises(StoreError) as refused:
        publish(tmp_path, "parts", {"model.onnx": b"other"}, SPEC, version="7")
    assert str(refused.value) == (f"model 'parts' version 7 exists ({tmp_path / 'parts' / '7'}); versions are never "
                                  "overwritten, as a running appliance may have it loaded: pick another version")
    assert snapshot(tmp_path / "parts") == before and hidden(tmp_path / "parts") == []
    assert publish(tmp_path, "parts", {"model.onnx": b"other"}, SPEC) == "8"


def test_an_invalid_spec_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    spec = {"task": "detect", "input": {"size": [64, 64], "layout": "NWHC"}, "outputs": {"decoder": "ssd", "scroe": "x"}}
    with pytest.raises(StoreError) as refused:
        publish(tmp_path, "boxes", {"model.onnx": b"network"}, spec)
    assert str(refused.value) == ("spec not written: model 'boxes' spec input.layout: Input should be 'NHWC' or "
                                  "'NCHW'; model 'boxes' spec outputs.scroe: unknown key (did you mean 'scores'?)")
    assert not (tmp_path / "boxes").exists()


def test_a_writer_that_fails_leaves_nothing(tmp_path: Path) -> None:
    publish(tmp_path, "parts", {"model.onnx": b"network"}, SPEC)
    before = snapshot(tmp_path / "parts")

    def half_written(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        publish(tmp_path, "parts", {"model.onnx": half_written}, SPEC)
    assert snapshot(tmp_path / "parts") == before and hidden(tmp_path / "parts") == []
    with pytest.raises(StoreError, match="no network file"):
        publish(tmp_path, "parts", {"weights.bin": b"not a network"}, SPEC)
    assert snapshot(tmp_path / "parts") == before and hidden(tmp_path / "parts") == []


def test_a_dead_writers_staging_folder_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    stale = tmp_path / "parts" / ".2.staging-999999-abc"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half written")
    old_fixed_name = tmp_path / "parts" / ".2.staging"  # what the segment trainer used to leave
    old_fixed_name.mkdir()
    assert publish(tmp_path, "parts", {"model.onnx": b"network"}, SPEC) == "1"
    assert hidden(tmp_path / "parts") == []


def test_folders_that_are_not_versions_are_written_once_and_only_broken_ones_removed(tmp_path: Path) -> None:
    folder = tmp_path / "_raw" / "package" / "1.0"
    publish_folder(folder, {"a.onnx": b"a", "source.yaml": b"sha256: x\n"})
    verify_manifest(folder)
    with pytest.raises(StoreError, match="exists; it is never overwritten"):
        publish_folder(folder, {"a.onnx": b"b"})
    with pytest.raises(StoreError, match="verifies: a good version is never removed"):
        discard_broken(folder)
    (folder / "a.onnx").write_bytes(b"tampered")
    assert "a.onnx sha256 mismatch" in discard_broken(folder)
    assert not folder.exists() and hidden(folder.parent) == []


def train(store: Path, good: Path, backbone: Path, pause: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, PAUSE_ENV: pause} if pause else {key: v for key, v in os.environ.items() if key != PAUSE_ENV}
    return subprocess.Popen([sys.executable, "-m", "appliance", "train", "anomaly", "--good", str(good), "--out",
                             str(store / "parts"), "--size", "64", "--backbone", str(backbone)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def kill_at(store: Path, good: Path, backbone: Path, point: str) -> None:
    """Run `appliance train anomaly` until the store writer reaches ``point``, then SIGKILL it there."""
    process = train(store, good, backbone, point)
    assert process.stderr is not None
    line = process.stderr.readline()  # the pause says where it stopped; nothing else goes to stderr before it
    assert line.startswith(f"store: paused at {point} "), line + process.stderr.read()
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_a_training_killed_at_every_point_of_the_write_leaves_the_store_for_the_next_run(
        tmp_path: Path, backbone_xml: Path) -> None:  # noqa: F811
    good = tmp_path / "good"
    good.mkdir()
    for index, frame in enumerate(good_parts(3, seed=0)):
        assert cv2.imwrite(str(good / f"{index}.png"), frame)
    store = tmp_path / "store"
    model_dir = store / "parts"
    first = train(store, good, backbone_xml)
    assert first.wait(timeout=120) == 0, first.communicate()
    before = snapshot(model_dir)
    assert list(before) == ["1", "current"] and before["current"] == "1"

    # Killed with the staging folder made, with the files but no manifest, and with the manifest but not yet
    # renamed: readers see the store as it was; the next run removes what the killed one left, and gets on.
    for point, staged in (("staging", []), ("files", ["model.bin", "model.xml", "spec.yaml"]),
                          ("manifest", ["manifest.json", "model.bin", "model.xml", "spec.yaml"])):
        kill_at(store, good, backbone_xml, point)
        assert snapshot(model_dir) == before, point
        (leftover,) = [model_dir / name for name in hidden(model_dir)]  # the previous run's is gone
        assert leftover.name.startswith(".2.staging-") and sorted(p.name for p in leftover.iterdir()) == staged

    # Killed between the rename and the switch: version 2 is complete and verified, and version 1 still serves.
    kill_at(store, good, backbone_xml, "renamed")
    assert hidden(model_dir) == [] and read_current(model_dir) == "1"
    assert {name: before[name] for name in before} == {name: snapshot(model_dir)[name] for name in before}
    verify_manifest(model_dir / "2")
    assert isinstance(read_spec(model_dir / "2"), AnomalySpec)

    last = train(store, good, backbone_xml)
    out, err = last.communicate(timeout=120)
    assert last.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"wrote {model_dir / '3'} (current -> 3)"
    assert read_current(model_dir) == "3" and hidden(model_dir) == [] and sorted(snapshot(model_dir)) == [
        "1", "2", "3", "current"]
    resolve_version(store, "parts")



def test_models_switch_points_current_only_at_a_version_that_verifies(tmp_path: Path) -> None:
    from appliance.runtime.store import point_current

    spec = {"task": "classify", "input": {"size": [2, 2]}, "labels": [{"id": 0, "name": "a"}]}
    first = publish(tmp_path, "m", {"model.onnx": b"one"}, spec)
    second = publish(tmp_path, "m", {"model.onnx": b"two"}, spec)
    assert read_current(tmp_path / "m") == second
    point_current(tmp_path, "m", first)
    assert read_current(tmp_path / "m") == first
    (tmp_path / "m" / second / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(StoreError, match="model.onnx sha256 mismatch"):
        point_current(tmp_path, "m", second)
    with pytest.raises(StoreError, match="version 9: .* not found"):
        point_current(tmp_path, "m", "9")
    with pytest.raises(StoreError, match="model 'other': .* not found"):
        point_current(tmp_path, "other", "1")
    assert read_current(tmp_path / "m") == first
