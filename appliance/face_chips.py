"""Face chips as dlib cuts them (``get_face_chip_details(shape, size, padding)``), aligned from BlazeFace's
keypoints instead of dlib's 5-point shape predictor, so no shape predictor is needed at run time.

dlib maps its 5 landmarks (eye corners, nose base) onto fixed template positions of a unit face square, then
pads the square by ``padding`` of its side on every side and scales it to ``size`` pixels. BlazeFace gives
other points (eye centres, nose tip, mouth centre, ears), so their positions in dlib's unit face square were
measured: dlib's own alignment of 28 faces at least 60 px wide (scikit-image's astronaut, face_recognition
1.3.0's test images, dlib's examples/faces), BlazeFace full range on the same faces, its keypoints mapped
through dlib's transform into the unit square, the median per point, the eyes made level and the nose and
mouth put on the eyes' midline. The spread
between faces is 0.03-0.04 of the square for the eyes and the mouth and 0.05-0.06 for the nose tip, which
moves with the head's pitch: the alignment uses the eyes and the mouth, a least-squares similarity (rotation,
uniform scale, shift) as dlib's ``find_similarity_transform``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from appliance.runtime.spec import InputSpec

# BlazeFace's keypoints in order: the person's right eye, left eye, nose tip, mouth centre, right ear, left ear.
KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")
# Where they lie in dlib's unit face square (x right, y down), measured as the module docstring says.
TEMPLATE = {"right_eye": (0.2173, 0.2266), "left_eye": (0.7702, 0.2266), "nose_tip": (0.4938, 0.5356),
            "mouth": (0.4938, 0.8171)}
ALIGN_ON = ("right_eye", "left_eye", "mouth")


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform (rotation, uniform scale, shift) that maps ``source`` points closest to
    ``target`` in least squares (N x 2 each, N >= 2)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(axis=0), target.mean(axis=0)
    s, t = source - source_mean, target - target_mean
    norm = float((s ** 2).sum())
    if norm <= 1e-12:
        raise ValueError("keypoints coincide: no alignment")
    a = float((s[:, 0] * t[:, 0] + s[:, 1] * t[:, 1]).sum()) / norm
    b = float((s[:, 0] * t[:, 1] - s[:, 1] * t[:, 0]).sum()) / norm
    rotation_scale = np.array([[a, -b], [b, a]])
    return np.hstack([rotation_scale, (target_mean - rotation_scale @ source_mean)[:, None]])


def chip_transform(keypoints: Sequence[Sequence[float]] | np.ndarray, size: int, padding: float,
                   align_on: Sequence[str] = ALIGN_ON) -> np.ndarray:
    """The 2x3 transform from image pixels to the pixels of a ``size`` x ``size`` chip with dlib's ``padding``,
    from BlazeFace's keypoints (6 x 2, image pixels, in ``KEYPOINTS`` order)."""
    points = np.asarray(keypoints, np.float64).reshape(-1, 2)
    if len(points) < 4:
        raise ValueError(f"{len(points)} keypoints; BlazeFace gives 6 (eyes, nose tip, mouth, ears)")
    chosen = [KEYPOINTS.index(name) for name in align_on]
    template = np.array([TEMPLATE[name] for name in align_on])
    target = (padding + template) / (1 + 2 * padding) * size
    return similarity(points[chosen], target)


def cut_chip(image: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    """The chip ``transform`` (image -> chip pixels, 2x3) defines, bilinear; a face much larger than the chip is
    first reduced with area averaging (as dlib's pyramid does), so that the chip does not alias."""
    scale = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    matrix = transform.astype(np.float64)
    if scale < 0.5:
        # Reduce only the part of the image that the chip covers, by a whole-pixel factor close to 1 / (2 scale).
        inverse = cv2.invertAffineTransform(matrix)
        corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ inverse.T
        height, width = image.shape[:2]
        x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int) - 2, 0, [width, height])
        x1, y1 = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 2, 0, [width, height])
        if x1 > x0 and y1 > y0:
            factor = 0.5 / scale
            part = image[y0:y1, x0:x1]
            reduced = cv2.resize(part, (max(1, round(part.shape[1] / factor)), max(1, round(part.shape[0] / factor))),
                                 interpolation=cv2.INTER_AREA)
            # reduced pixel (u, v) covers part pixels around ((u + 0.5) * fx - 0.5, ...): map chip -> reduced.
            fx, fy = part.shape[1] / reduced.shape[1], part.shape[0] / reduced.shape[0]
            to_part = np.array([[fx, 0, x0 + 0.5 * fx - 0.5], [0, fy, y0 + 0.5 * fy - 0.5], [0, 0, 1]])
            matrix = (np.vstack([matrix, [0, 0, 1]]) @ to_part)[:2]
            image = reduced
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def chip_padding(spec_input: InputSpec, default: float = 0.25) -> float:
    """The chip padding a face model was trained with: its spec's ``input.chip_padding`` (dlib's descriptor
    0.25, its age and gender networks 0.2)."""
    return spec_input.chip_padding if spec_input.chip_padding is not None else default


def face_chip(image: np.ndarray, keypoints: np.ndarray, size: int, padding: float) -> np.ndarray:
    """The aligned BGR chip of one face from its BlazeFace keypoints (image pixels)."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cut_chip(image, chip_transform(keypoints, size, padding), size)
