"""Procedural stochastic surfaces for the anomaly benchmark: sand, granite, felt, cast iron and foam.

scikit-image ships three textures of the kind the issue worries about (grass, gravel and, in a way, the Hubble
deep field); these five add the surfaces a line actually inspects whose own variation looks like a defect:

* ``sand``: fine grains (noise at 1-3 px) with scattered bright and dark grains and faint wind ripples;
* ``granite``: interlocking crystals (a Voronoi tiling of 5-12 px cells) of three minerals, light feldspar,
  grey quartz and dark mica, each with its own grain noise;
* ``felt``: thousands of short curved fibres of random tone on a mottled ground;
* ``cast_iron``: a grey matrix with dark curved graphite flakes (5-25 px) and small casting pores;
* ``foam``: closed cells (Voronoi, 8-20 px) with bright walls and shaded, darker interiors.

Each is a 512x512 grey u8 image made with numpy and OpenCV alone from a seed: the same seed gives the same
image (on this machine bit for bit; OpenCV's SIMD paths may move a pixel by one grey level elsewhere).
Like scikit-image's textures they have a mid-grey median, so the defects of defects.py mean the same on them.

    .venv/bin/python -m appliance.training.surfaces OUT_DIR [--seed 0]   # writes OUT_DIR/<name>.png
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

SIZE = 512


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise blurred with a Gaussian of ``sigma`` px, scaled to zero mean and unit standard deviation."""
    noise: np.ndarray = rng.standard_normal(shape).astype(np.float32)
    if sigma > 0:
        noise = cv2.GaussianBlur(noise, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    return (noise - noise.mean()) / max(float(noise.std()), 1e-6)


def _to_grey(values: np.ndarray, median: float, spread: float) -> np.ndarray:
    """Map float values so that their median is ``median`` and their std ``spread``, clipped to u8."""
    values = values.astype(np.float32)
    scaled = (values - np.median(values)) / max(float(values.std()), 1e-6) * spread + median
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _voronoi_labels(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> tuple[np.ndarray, int]:
    """Labels 1..N of a Voronoi tiling of random seeds about ``spacing`` px apart (nearest seed, L2)."""
    count = max(1, int(shape[0] * shape[1] / spacing**2))
    seeds = np.ones(shape, np.uint8)
    ys = rng.integers(0, shape[0], count)
    xs = rng.integers(0, shape[1], count)
    seeds[ys, xs] = 0
    _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    return labels, int(labels.max())


def _cell_walls(labels: np.ndarray) -> np.ndarray:
    """True where a pixel's right or lower neighbour belongs to another cell."""
    walls = np.zeros(labels.shape, bool)
    walls[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    walls[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return walls


def _curved_strokes(canvas: np.ndarray, rng: np.random.Generator, count: int, length: tuple[float, float],
                    thickness: tuple[int, int], tones: Callable[[np.random.Generator, int], np.ndarray],
                    bend: float) -> None:
    """Draw ``count`` gently curved anti-aliased polylines of random tone into the float canvas (in place), each
    over those drawn before it. ``tones(rng, count)`` gives their grey levels."""
    height, width = canvas.shape
    steps = 6
    step_length = rng.uniform(*length, count) / steps
    headings = rng.uniform(0, 2 * np.pi, count)[:, None] + rng.normal(0, bend, count)[:, None] * np.arange(1, steps + 1)
    starts = np.stack([rng.uniform(0, width, count), rng.uniform(0, height, count)], axis=1)[:, None, :]
    moves = np.stack([np.cos(headings), np.sin(headings)], axis=2) * step_length[:, None, None]
    paths = np.concatenate([starts, starts + np.cumsum(moves, axis=1)], axis=1)
    # Fixed-point coordinates (shift 4) keep the sub-pixel positions of the anti-aliased lines.
    fixed = np.round(paths * 16).astype(np.int32)
    values = tones(rng, count).astype(np.float64)
    widths = rng.integers(thickness[0], thickness[1] + 1, count)
    for polyline, value, width_px in zip(fixed, values, widths, strict=True):
        cv2.polylines(canvas, [polyline], False, float(value), int(width_px), cv2.LINE_AA, shift=4)


def sand(seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng([seed, 1])
    shape = (size, size)
    grains = 1.0 * smooth_noise(rng, shape, 0.8) + 0.6 * smooth_noise(rng, shape, 1.6) \
        + 0.35 * smooth_noise(rng, shape, 3.0)
    # Wind ripples: a faint wave about 40 px long whose crests wander (a phase warped by smooth noise).
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    direction = rng.uniform(0, np.pi)
    along = x * np.cos(direction) + y * np.sin(direction)
    phase = 2 * np.pi * (along / rng.uniform(34, 46)) + 1.5 * smooth_noise(rng, shape, 24.0)
    ripples = 0.45 * np.sin(phase) + 0.3 * smooth_noise(rng, shape, 40.0)
    image = grains + ripples
    # Scattered coarse grains, darker (mica, shell) or lighter (quartz) than the rest: 1-2 px.
    canvas = np.zeros(shape, np.float32)
    for _ in range(size * size // 180):
        cv2.circle(canvas, (int(rng.integers(size)), int(rng.integers(size))), int(rng.integers(1, 3)),
                   float(rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.2)), -1, cv2.LINE_AA)
    return _to_grey(image + cv2.GaussianBlur(canvas, (0, 0), 0.6), 128, 30)


def granite(seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng([seed, 2])
    shape = (size, size)
    labels, count = _voronoi_labels(rng, shape, rng.uniform(7, 9))
    # Three minerals in granite's proportions, each crystal one tone with a little spread.
    mineral = rng.choice(3, count + 1, p=[0.5, 0.33, 0.17])
    tone = np.array([172.0, 122.0, 48.0])[mineral] + rng.normal(0, 12, count + 1)
    image = tone[labels].astype(np.float32)
    # Crystals are not flat: fine grain noise, stronger in the dark mica, and darker boundaries.
    grain = smooth_noise(rng, shape, 0.7)
    image += grain * np.where(mineral[labels] == 2, 14.0, 8.0).astype(np.float32)
    image -= 18.0 * _cell_walls(labels).astype(np.float32)
    image += 10.0 * smooth_noise(rng, shape, 30.0)
    return _to_grey(cv2.GaussianBlur(image, (0, 0), 0.6), 128, 38)


def felt(seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng([seed, 3])
    shape = (size, size)
    canvas = (6.0 * smooth_noise(rng, shape, 12.0)).astype(np.float32)
    # Layers of fibres: each new one covers those below where it passes (a pressed mat, not a sum of lines).
    _curved_strokes(canvas, rng, size * size // 20, (8, 30), (1, 2), lambda r, n: r.normal(0, 22, n), 0.25)
    image = canvas + 4.0 * smooth_noise(rng, shape, 0.7)
    return _to_grey(cv2.GaussianBlur(image, (0, 0), 0.7), 125, 26)


def cast_iron(seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng([seed, 4])
    shape = (size, size)
    image = 140.0 + 9.0 * smooth_noise(rng, shape, 1.0) + 6.0 * smooth_noise(rng, shape, 18.0)
    canvas = np.zeros(shape, np.float32)
    # Graphite flakes of grey iron: dark, thin, curved, randomly oriented, 5-25 px.
    _curved_strokes(canvas, rng, size * size // 330, (5, 25), (1, 2), lambda r, n: r.uniform(-75, -40, n), 0.15)
    flakes = cv2.GaussianBlur(canvas, (0, 0), 0.5)
    # Casting pores: a few small dark pits.
    pores = np.zeros(shape, np.float32)
    for _ in range(size * size // 2500):
        cv2.circle(pores, (int(rng.integers(size)), int(rng.integers(size))), int(rng.integers(1, 3)),
                   float(-rng.uniform(30, 60)), -1, cv2.LINE_AA)
    return _to_grey(image + np.minimum(flakes, 0) + pores, 130, 24)


def foam(seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng([seed, 5])
    shape = (size, size)
    labels, count = _voronoi_labels(rng, shape, rng.uniform(13, 15))
    walls = _cell_walls(labels)
    distance = cv2.distanceTransform((~walls).astype(np.uint8), cv2.DIST_L2, 5)
    # Bright walls, interiors shaded darker towards the cell centre, each cell its own depth.
    depth = rng.uniform(0.6, 1.4, count + 1)[labels].astype(np.float32)
    image = 190.0 - 55.0 * np.sqrt(np.minimum(distance, 9.0) / 9.0) * depth
    image += 8.0 * smooth_noise(rng, shape, 0.8) + 8.0 * smooth_noise(rng, shape, 25.0)
    return _to_grey(cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.8), 128, 30)


SURFACES: dict[str, Callable[..., np.ndarray]] = {
    "sand": sand, "granite": granite, "felt": felt, "cast_iron": cast_iron, "foam": foam,
}


@functools.cache
def _surface(name: str, seed: int) -> np.ndarray:
    image = SURFACES[name](seed)
    image.setflags(write=False)
    return image


def surfaces(seed: int = 0) -> dict[str, np.ndarray]:
    """Every procedural surface as a read-only 512x512 grey u8 image, by name (cached per seed)."""
    return {name: _surface(name, seed) for name in SURFACES}


def surface(name: str, seed: int = 0) -> np.ndarray:
    """One procedural surface by name; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in SURFACES:
        raise ValueError(f"unknown surface '{name}'; known: {', '.join(SURFACES)}")
    return _surface(name, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the procedural surfaces as PNG files.")
    parser.add_argument("out", type=Path, help="folder to write <name>.png into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in surfaces(args.seed).items():
        cv2.imwrite(str(args.out / f"{name}.png"), image)
        print(args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
