"""appliance/firmware_profiles/*.yaml (package data; $APPLIANCE_PROFILES_DIR replaces the folder): how one kind of
Intel edge hardware is driven through OpenVINO."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from appliance.config.project import StrictModel
from appliance.config.source import Problem, load_yaml, validation_problems
from appliance.paths import profiles_dir as profiles_dir  # re-exported: the CLI and tests ask here


class FirmwareProfile(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    description: str
    # An OpenVINO device name: CPU, GPU, GPU.0, NPU, or a virtual device such as AUTO:NPU,GPU,CPU.
    device: str = Field(min_length=3)
    # OpenVINO properties passed to compile_model, e.g. PERFORMANCE_HINT: THROUGHPUT. The CPU's default
    # precision is bf16 where the CPU has it, which moves calibrated anomaly scores between PCs: pin it.
    properties: dict[str, str | int | bool] = Field(default_factory=dict)
    cache: bool = Field(True, description="compile through OpenVINO's model cache (CACHE_DIR)")
    static_shapes: bool = Field(False, description="reshape every model to fixed input sizes (the NPU needs it)")
    needs: list[str] = Field(default_factory=list, description="drivers, device nodes and groups, for people")
    fallback: str | None = Field(None, description="device used when `device` is absent, if allowed")
    allow_fallback: bool = False
    performance: Literal["latency", "throughput"] = "throughput"


def load_profile(name: str, directory: Path | None = None) -> tuple[FirmwareProfile | None, list[Problem]]:
    directory = directory or profiles_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml"))) or "none"
        return None, [Problem(str(path), 0, 0, "", f"firmware profile '{name}' not found; known: {known}")]
    doc = load_yaml(path)
    if doc.problems:
        return None, doc.problems
    try:
        return FirmwareProfile.model_validate(doc.data), []
    except ValidationError as error:
        return None, validation_problems(doc, error, FirmwareProfile)


def all_profiles(directory: Path | None = None) -> dict[str, FirmwareProfile | list[Problem]]:
    directory = directory or profiles_dir()
    found: dict[str, FirmwareProfile | list[Problem]] = {}
    for path in sorted(directory.glob("*.yaml")):
        profile, problems = load_profile(path.stem, directory)
        found[path.stem] = profile if profile is not None else problems
    return found
