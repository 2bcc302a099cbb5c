"""Training images and masks: read from folders as the command line names them, and sized for the feature graph."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from appliance.nodes.model import shrink
from appliance.training import TrainingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
    """u8 BGR size x size, resized as the anomaly@1 and segment@1 nodes do (`shrink`: area when shrinking,
    bilinear when enlarging), so that thresholds calibrated here hold on the line."""
    if image.dtype != np.uint8:
        raise TrainingError(f"images must be u8 grey or BGR, got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise TrainingError(f"images must be HxW or HxWx3, got shape {image.shape}")
    return np.ascontiguousarray(shrink(image, size, size)[0])


def load_images(folder: Path) -> tuple[list[np.ndarray], list[Path]]:
    """Every png/jpg/bmp image of ``folder`` (not recursive), sorted by name, as u8 BGR."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"{folder}: not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    images = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise TrainingError(f"{path}: not a readable image")
        images.append(image)
    return images, paths


def load_anomaly_masks(folder: Path, bad_paths: list[Path]) -> list[np.ndarray]:
    """The defect mask of each bad image: NAME.png or NAME_mask.png (any image suffix), as bool."""
    masks = []
    for path in bad_paths:
        candidates = [folder / f"{path.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
        candidates += [folder / f"{path.stem}_mask{suffix}" for suffix in IMAGE_SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise TrainingError(f"no mask for {path.name} in {folder} (expected {path.stem}.png or "
                                f"{path.stem}_mask.png)")
        mask = cv2.imread(str(found), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise TrainingError(f"{found}: not a readable image")
        masks.append(mask > 0)
    return masks


def load_class_masks(folder: Path, image_paths: list[Path]) -> list[np.ndarray]:
    """The class-id mask (PNG named like the image, pixel value = class id) of each image, for segmentation."""
    masks = []
    for path in image_paths:
        found = folder / f"{path.stem}.png"
        mask = cv2.imread(str(found), cv2.IMREAD_GRAYSCALE) if found.is_file() else None
        if mask is None:
            raise TrainingError(f"no readable mask {found} for {path.name}")
        masks.append(mask)
    return masks


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A defect mask (any size, bool or u8, grey or colour) as size x size bool, nearest neighbour."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(2)
    mask = (mask > 0).astype(np.uint8)
    return cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST) > 0

