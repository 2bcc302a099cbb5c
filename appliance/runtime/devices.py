"""Which OpenVINO devices this machine has, and whether each firmware profile can run here (and on what)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

import openvino as ov

from appliance.config.profile import FirmwareProfile


@cache
def core() -> ov.Core:
    """One OpenVINO Core per process: it owns the plugins and their thread pools."""
    return ov.Core()


def available_devices() -> list[str]:
    return list(core().available_devices)


def device_name(device: str) -> str:
    try:
        return str(core().get_property(device, "FULL_DEVICE_NAME"))
    except RuntimeError:
        return device


@dataclass(frozen=True)
class Placement:
    """Where a profile's models run on this machine, or why they cannot."""

    profile: str
    requested: str
    device: str | None
    reason: str

    @property
    def runnable(self) -> bool:
        return self.device is not None


def _present(device: str, available: list[str]) -> bool:
    if device.startswith(("AUTO", "HETERO", "MULTI")):
        _, _, candidates = device.partition(":")
        return not candidates or any(_present(c.strip(), available) for c in candidates.split(","))
    base = device.split(".")[0]
    return device in available or (device == base and any(a.split(".")[0] == base for a in available))


def _present_candidates(device: str, available: list[str]) -> str:
    """AUTO:NPU,GPU,CPU -> AUTO:CPU here: OpenVINO fails to compile when a listed plugin cannot even load
    (measured: the GPU plugin without libOpenCL.so.1), instead of skipping it."""
    kind, _, candidates = device.partition(":")
    if kind not in ("AUTO", "HETERO", "MULTI") or not candidates:
        return device
    present = [c.strip() for c in candidates.split(",") if _present(c.strip(), available)]
    return f"{kind}:{','.join(present)}"


def _remote_host(profile: FirmwareProfile) -> str:
    """The remote's host and port, never its path or query (where a key could hide), nor an unset variable."""
    assert profile.remote is not None
    try:
        url = profile.remote.resolved_url()
    except ValueError as error:
        return f"(url not set: {error})"
    return urlsplit(url).netloc or url


def place(profile: FirmwareProfile, available: list[str] | None = None) -> Placement:
    """Resolve a profile's device against what OpenVINO sees (RELIABILITY 11.4: never fall back silently)."""
    if profile.remote is not None:
        # No OpenVINO device here: the models run on the KServe server (whether it answers is checked at load).
        return Placement(profile.name, profile.device, profile.device, f"remote KServe server {_remote_host(profile)}")
    available = available_devices() if available is None else available
    shown = ", ".join(available) or "none"
    if _present(profile.device, available):
        device = _present_candidates(profile.device, available)
        return Placement(profile.name, profile.device, device, f"{device} is available")
    absent = f"profile {profile.name}: device {profile.device} not available (available: {shown})"
    if profile.fallback and _present(profile.fallback, available):
        if profile.allow_fallback:
            return Placement(profile.name, profile.device, profile.fallback, f"{absent}; using {profile.fallback}")
        return Placement(profile.name, profile.device, None,
                         f"{absent}; fallback {profile.fallback} is present but not allowed "
                         f"(set allow_fallback: true in the profile to use it)")
    return Placement(profile.name, profile.device, None, f"{absent}; no fallback")
