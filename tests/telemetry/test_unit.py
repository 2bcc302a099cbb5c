"""systemd/appliance@.service passes systemd-analyze verify and keeps its exposure score low (RELIABILITY 14)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO, needs_tool

pytestmark = needs_tool("systemd-analyze")


@pytest.fixture
def unit(tmp_path):
    """The unit as an instance, with ExecStart pointed at a stub (the appliance is not installed in /opt here)."""
    stub = tmp_path / "appliance"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (REPO / "systemd" / "appliance@.service").read_text()
    text = text.replace("/opt/appliance/.venv/bin/appliance", str(stub))
    path = tmp_path / "appliance@demo.service"
    path.write_text(text)
    return path


def test_unit_verifies(unit):
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unit_exposure_stays_low(unit):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                            text=True)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout[-500:]
    assert float(match.group(1)) <= 2.0


def test_unit_keeps_jit_allowed_and_shared_memory_usable():
    text = (REPO / "systemd" / "appliance@.service").read_text()
    assert "MemoryDenyWriteExecute=no" in text  # OpenVINO's CPU plugin JIT-compiles its kernels
    assert "RemoveIPC=no" in text and "\nDynamicUser=" not in text  # clients' /dev/shm blocks survive
    assert "InaccessiblePaths=/dev/shm" not in text and "ProcSubset=pid" not in text
    assert "RestartPreventExitStatus=78" in text and "Type=notify" in text and "WatchdogSec=" in text
