"""spec.yaml: what a stored model expects and returns, read once when the model is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.runtime.store import StoreError


class InputSpec(BaseModel):
    # Provenance notes (normalisation text, size order) may ride along; the runtime reads only these fields.
    model_config = ConfigDict(extra="allow", frozen=True)

    name: str | None = None
    size: tuple[int, int] = Field(description="height, width")
    element_type: Literal["u8", "f32"] = "u8"
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    colour_order: Literal["BGR", "RGB"] = "BGR"
    # f32 inputs: value = (pixel * scale - mean) / std, per channel in the model's colour order.
    scale: float = 1.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


class LabelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    name: str
    color: str | None = Field(None, pattern=r"^#[0-9a-fA-F]{6}$")
    names: dict[str, str] = Field(default_factory=dict, description="the name per language code")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    task: Literal["anomaly", "classify", "detect", "segment", "ocr", "faces", "features", "demographics"]
    input: InputSpec
    outputs: Any = None
    labels: list[LabelSpec] = Field(default_factory=list)
    exclusive: bool = True
    boxes: bool = False
    threshold: float | None = None
    pixel_threshold: float | None = None
    # The precision a model needs whatever the profile says (OpenVINO's INFERENCE_PRECISION_HINT), for models
    # whose outputs move under bf16 or f16 (APIS.md 3: bf16 moves the age probabilities by 1.3e-2).
    precision: Literal["f32", "f16", "bf16"] | None = None


def read_spec(version_dir: Path) -> ModelSpec:
    path = version_dir / "spec.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise StoreError(f"{path}: cannot read ({error})") from None
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StoreError(f"{path}: {where}: {first['msg']} ({error.error_count()} problem(s))") from None
