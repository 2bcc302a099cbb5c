"""Firmware profiles against the devices OpenVINO sees on this machine (CPU only in CI)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.config.profile import FirmwareProfile, all_profiles, load_profile
from appliance.runtime.devices import available_devices, place
from appliance.runtime.models import LoadedModel, RuntimeOptions
from appliance.runtime.store import resolve_version
from tests.conftest import REPO
from tests.nodes.test_anomaly import save_red_detector


def test_every_shipped_profile_is_valid():
    profiles = all_profiles()
    assert set(profiles) >= {"cpu", "igpu", "npu", "auto"}
    assert all(isinstance(p, FirmwareProfile) for p in profiles.values())


def test_devices_command_says_what_runs_here_and_why_not():
    result = subprocess.run([sys.executable, "-m", "appliance", "devices"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    assert "CPU" in result.stdout
    if "GPU" not in available_devices():
        assert "igpu   cannot run here: profile igpu: device GPU not available" in result.stdout
        assert "libOpenCL.so.1" in result.stdout  # what the profile says it needs
    if "NPU" not in available_devices():
        assert "npu    cannot run here: profile npu: device NPU not available" in result.stdout


def test_a_profile_may_allow_its_fallback():
    profile, _ = load_profile("igpu")
    assert profile is not None
    allowed = profile.model_copy(update={"allow_fallback": True})
    placement = place(allowed, ["CPU"])
    assert placement.device == "CPU" and "using CPU" in placement.reason
    assert place(profile, ["CPU"]).device is None
    assert place(profile, ["CPU", "GPU.0"]).device == "GPU"


def test_auto_lists_only_present_devices():
    profile, _ = load_profile("auto")
    assert profile is not None
    assert place(profile, ["CPU"]).device == "AUTO:CPU"
    assert place(profile, ["CPU", "NPU"]).device == "AUTO:NPU,CPU"


@pytest.mark.parametrize("name, precision", [("cpu", "f32"), ("auto", None)])
def test_a_model_compiles_with_the_cpu_and_auto_profiles(tmp_path, name, precision):
    save_red_detector(tmp_path / "store")
    profile, _ = load_profile(name)
    assert profile is not None
    placement = place(profile)
    loaded = LoadedModel("red", resolve_version(tmp_path / "store", "red"),
                         RuntimeOptions.from_profile(profile, placement.device or "", tmp_path / "cache"))
    assert loaded.execution_devices == ["CPU"]
    assert loaded.slots >= 1
    if precision:
        # Pinned: this CPU would default to bf16 and shift calibrated scores (MODELS.md 5).
        assert loaded.precision == precision
    assert any((tmp_path / "cache").iterdir())  # the compiled blob went to the cache


def test_a_read_only_cache_is_reported_and_skipped(tmp_path, caplog):
    from appliance.runtime.models import usable_cache_dir

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    assert usable_cache_dir(blocked / "cache") is None
    assert "model cache disabled" in caplog.text


def test_a_profile_with_a_remote_server_is_runnable_without_an_openvino_device():
    profile = FirmwareProfile.model_validate({"name": "kserve", "description": "remote", "device": "kserve",
                                             "remote": {"url": "http://10.0.0.5:8000/base"}})
    placement = place(profile, [])
    assert (placement.runnable, placement.device, placement.reason) == (
        True, "kserve", "remote KServe server 10.0.0.5:8000")
