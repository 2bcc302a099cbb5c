"""appliance/runtime/models.py in-process, on real compiled models in a tmp store: slots, the input every model is
given, pinned versions, switch, refresh, and successor/take_over as a reload uses them. What the server shows of
these (HTTP switch, health, metrics, SIGHUP) is in tests/server/test_reload.py and tests/server/test_faults.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.runtime.models import LoadedModel, Runtime, RuntimeOptions
from appliance.runtime.store import StoreError, read_current, switch_current
from tests.nodes.test_anomaly import save_red_detector

RED_BGR = np.zeros((1, 64, 64, 3), np.uint8)
RED_BGR[..., 2] = 255  # OpenCV order: red is the last channel


class Recorder:
    """A RuntimeObserver that keeps what it was told (the server's metrics are the real one)."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, bool]] = []
        self.failed: list[str] = []
        self.inferences = 0

    def inference(self, model: LoadedModel, seconds: float) -> None:
        self.inferences += 1

    def model_loaded(self, name: str, swapped: bool) -> None:
        self.loaded.append((name, swapped))

    def model_load_failed(self, name: str) -> None:
        self.failed.append(name)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Model `red` with versions 1 (threshold 0.5) and 2 (threshold 0.7); `current` names 2."""
    save_red_detector(tmp_path, "1", threshold=0.5)
    save_red_detector(tmp_path, "2", threshold=0.7)
    return tmp_path


def runtime(store: Path) -> Runtime:
    loaded = Runtime(store, RuntimeOptions("CPU"))
    loaded.observer = Recorder()
    return loaded


def recorder(runtime: Runtime) -> Recorder:
    assert isinstance(runtime.observer, Recorder)
    return runtime.observer


def threshold(model: LoadedModel | None) -> float | None:
    assert model is not None
    return model.spec.threshold  # type: ignore[attr-defined]


def test_a_frame_in_opencvs_u8_bgr_reaches_the_model_as_its_spec_asks(store: Path) -> None:
    # The spec asks for f32 RGB scaled by 1/255: the red detector's score is the red channel's maximum.
    model = runtime(store).slot("red").load()
    assert model.version == "2" and model.input_size == (64, 64) and model.slots >= 1
    assert model.infer(RED_BGR)["pred_score"].tolist() == [pytest.approx(1.0)]
    assert model.infer(RED_BGR[..., ::-1].copy())["pred_score"].tolist() == [pytest.approx(0.0)]  # blue


def test_a_model_asked_for_again_is_the_same_slot_another_device_or_shape_another(store: Path) -> None:
    models = runtime(store)
    slot = models.slot("red")
    assert models.slot("red") is slot
    by_device, batched = models.slot("red", device="CPU"), models.slot("red", input_shape=(-1, 64, 64))
    assert len({id(slot), id(by_device), id(batched)}) == 3
    assert set(models.slots) == {"red", "red@CPU", "red[-1x64x64]"}
    # A dynamic batch: three frames in one inference, one score each.
    scores = batched.load().infer(np.concatenate([RED_BGR, np.zeros_like(RED_BGR), RED_BGR]))["pred_score"]
    assert scores.tolist() == [pytest.approx(1.0), pytest.approx(0.0), pytest.approx(1.0)]


def test_a_pinned_runtime_loads_its_version_and_never_follows_the_pointer(store: Path) -> None:
    models = runtime(store)
    following = models.slot("red")
    following.load()
    pinned = models.pinned("1").slot("red")
    assert threshold(pinned.load()) == 0.5 and pinned.current is not None and pinned.current.version == "1"
    assert "red" in models.slots and pinned is not models.slots["red"]  # the pinned slot is not the project's
    switch_current(store / "red", "1")
    switch_current(store / "red", "2")
    assert not pinned.pointer_moved()
    assert models.switch("red", "1") == "2"
    assert pinned.current.version == "1" and following.current is not None and following.current.version == "1"
    with pytest.raises(StoreError):
        models.pinned("9").slot("red").load()


def test_switch_swaps_every_slot_of_the_model_and_a_request_holding_the_old_version_finishes_on_it(
        store: Path) -> None:
    models = runtime(store)
    slots = [models.slot("red"), models.slot("red", device="CPU")]
    for slot in slots:
        slot.load()
    held = slots[0].current  # what a node read at the start of its frame
    assert models.switch("red", "1") == "2"
    assert read_current(store / "red") == "1"
    assert [threshold(slot.current) for slot in slots] == [0.5, 0.5]
    assert held is not None and held.version == "2" and held.infer(RED_BGR)["pred_score"].tolist() == [
        pytest.approx(1.0)]
    assert recorder(models).loaded == [("red", False), ("red", False), ("red", True), ("red", True)]


def test_a_switch_that_cannot_compile_leaves_every_slot_and_the_pointer(store: Path) -> None:
    models = runtime(store)
    slots = [models.slot("red"), models.slot("red", device="CPU")]
    for slot in slots:
        slot.load()
    before = [slot.current for slot in slots]
    with pytest.raises(StoreError):
        models.switch("red", "3")
    assert [slot.current for slot in slots] == before and read_current(store / "red") == "2"
    assert [slot.failed_version for slot in slots] == ["3", "3"]
    assert recorder(models).failed == ["red"]
    with pytest.raises(StoreError, match="model 'blue' is not loaded by this project"):
        models.switch("blue", "1")


def test_refresh_follows_a_moved_pointer_once_and_keeps_serving_through_a_broken_version(store: Path) -> None:
    models = runtime(store)
    slot = models.slot("red")
    slot.load()
    assert models.refresh() == []
    switch_current(store / "red", "1")  # `appliance models switch` from another process, or a trainer
    assert models.refresh() == ["red 1"] and threshold(slot.current) == 0.5
    assert models.refresh() == []
    broken = store / "red" / "3"
    broken.mkdir()
    (broken / "spec.yaml").write_text("task: anomaly\n")
    switch_current(store / "red", "3")
    serving = slot.current
    assert models.refresh() == [] and slot.current is serving and slot.failed_version == "3"
    failures = len(recorder(models).failed)
    assert models.refresh() == [] and len(recorder(models).failed) == failures  # not compiled again every poll
    switch_current(store / "red", "2")
    assert models.refresh() == ["red 2"] and slot.failed_version is None and threshold(slot.current) == 0.7


def test_a_successor_shares_the_loaded_slots_until_its_inheritance_ends_and_reports_once_it_takes_over(
        store: Path) -> None:
    old = runtime(store)
    slot = old.slot("red")
    loaded = slot.load()
    new = old.successor()
    new.observer = Recorder()  # the server's metrics of the reloaded project
    assert new.slot("red") is slot and slot.current is loaded  # no second compile, no second copy
    assert new.slot("red", device="CPU") is not slot  # a slot the predecessor never had is new
    new.end_inheritance()
    assert new.slot("red") is slot  # taken before the end: kept
    assert old.successor().slot("red") is slot
    third = old.successor()
    third.end_inheritance()
    assert third.slot("red") is not slot  # not taken before the end: its own slot
    # Until take_over, a swap reports to the runtime that loaded the slot; afterwards to the one serving.
    switch_current(store / "red", "1")
    assert old.refresh() == ["red 1"]
    assert recorder(old).loaded[-1] == ("red", True) and recorder(new).loaded == []
    new.take_over()
    assert new.switch("red", "2") == "1"
    # The inherited slot swaps; the successor's own `red@CPU` was never loaded, so it loads (not a swap).
    assert recorder(new).loaded == [("red", True), ("red", False)]
    assert recorder(old).loaded.count(("red", True)) == 1
