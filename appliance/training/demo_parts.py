"""The demo project's camera frames: a brick-faced tile on a dark belt, good or with one synthetic defect.

Each frame is 384x512 BGR (height x width). The tile (448x320 px, rounded corners) is cut from scikit-image's
``brick`` at a random place, tinted terracotta, shifted up to 6 px and lit 6 % brighter or darker, with
sensor noise: the variation a fixed camera sees between parts. A bad part has one defect of defects.py, the
kinds in turn (scratch, spot, foreign, stain, hole), drawn at twice the benchmark's size because the anomaly
model sees the frame at 256x256 (half the width): brick is the texture where the held-out benchmark reaches
AUROC ~1.0, so `make run` gets a demo model that flags every bad part after a 2 s training.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from appliance.training.defects import KINDS, add_defect, textures

FRAME_SIZE = (384, 512)  # height, width
TILE_SIZE = (320, 448)
_CORNER_RADIUS = 24
_MAX_SHIFT = 6
_BRIGHTNESS_JITTER = 0.06
_TINT_BGR = np.array([0.55, 0.72, 1.0], np.float32)  # terracotta
_BELT_GREY = 38
_NOISE_SIGMA = 2.0
_DEFECT_SCALE = 2.0


def _tile_mask() -> np.ndarray:
    height, width = TILE_SIZE
    mask = np.zeros(TILE_SIZE, np.uint8)
    r = _CORNER_RADIUS
    cv2.rectangle(mask, (r, 0), (width - 1 - r, height - 1), 1, -1)
    cv2.rectangle(mask, (0, r), (width - 1, height - 1 - r), 1, -1)
    for x, y in ((r, r), (width - 1 - r, r), (r, height - 1 - r), (width - 1 - r, height - 1 - r)):
        cv2.circle(mask, (x, y), r, 1, -1, cv2.LINE_8)
    return mask > 0


def _part(rng: np.random.Generator, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    brick = textures()["brick"]
    height, width = TILE_SIZE
    top = int(rng.integers(0, brick.shape[0] - height + 1))
    left = int(rng.integers(0, brick.shape[1] - width + 1))
    grey = brick[top:top + height, left:left + width]
    brightness = 1.0 + rng.uniform(-_BRIGHTNESS_JITTER, _BRIGHTNESS_JITTER)
    tile = np.clip(grey[:, :, None].astype(np.float32) * _TINT_BGR * brightness, 0, 255).astype(np.uint8)
    defect_mask = np.zeros(TILE_SIZE, bool)
    if defect is not None:
        tile, defect_mask = add_defect(tile, defect, rng, scale=_DEFECT_SCALE, foreign_from=textures()["gravel"])
    frame_height, frame_width = FRAME_SIZE
    frame = np.full((frame_height, frame_width, 3), _BELT_GREY, np.float32)
    y0 = (frame_height - height) // 2 + int(rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1))
    x0 = (frame_width - width) // 2 + int(rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1))
    inside = _tile_mask()
    region = frame[y0:y0 + height, x0:x0 + width]
    region[inside] = tile[inside]
    frame += rng.normal(0.0, _NOISE_SIGMA, frame.shape).astype(np.float32)
    mask = np.zeros(FRAME_SIZE, bool)
    mask[y0:y0 + height, x0:x0 + width] = defect_mask & inside
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8), mask


def good_parts(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` good frames (384x512 BGR u8); the same seed gives the same frames."""
    rng = np.random.default_rng([seed, 0])
    return [_part(rng, None)[0] for _ in range(n)]


def bad_parts(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` defective frames and their bool 384x512 defect masks; frame i has defect ``KINDS[i % 5]``.

    Drawn from another random stream than ``good_parts`` with the same seed, so no bad frame is a good one
    with a defect added.
    """
    rng = np.random.default_rng([seed, 1])
    parts = [_part(rng, KINDS[index % len(KINDS)]) for index in range(n)]
    return [image for image, _ in parts], [mask for _, mask in parts]


def write_demo_images(folder: Path, n_good: int, n_bad: int, seed: int = 0) -> dict[str, list[Path]]:
    """PNGs in ``folder``/good, ``folder``/bad (named ``bad_007_stain.png``) and ``folder``/masks (the bad
    frames' defect masks under the same names, 255 = defect, as ``appliance train anomaly --val-masks`` reads).
    Returns the paths written, by sub-folder."""
    folder = Path(folder)
    written: dict[str, list[Path]] = {"good": [], "bad": [], "masks": []}
    for name in written:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(good_parts(n_good, seed)):
        path = folder / "good" / f"good_{index:03d}.png"
        _write(path, image)
        written["good"].append(path)
    images, masks = bad_parts(n_bad, seed)
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        name = f"bad_{index:03d}_{KINDS[index % len(KINDS)]}.png"
        _write(folder / "bad" / name, image)
        _write(folder / "masks" / name, mask.astype(np.uint8) * 255)
        written["bad"].append(folder / "bad" / name)
        written["masks"].append(folder / "masks" / name)
    return written


def _write(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")
