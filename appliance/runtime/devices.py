"""Which OpenVINO devices this machine has, and whether each firmware profile can run here (and on what)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

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


def place(profile: FirmwareProfile, available: list[str] | None = None) -> Placement:
    """Resolve a profile's device against what OpenVINO sees (RELIABILITY 11.4: never fall back silently)."""
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
