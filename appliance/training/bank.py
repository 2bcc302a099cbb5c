"""The anomaly model's memory bank: what training keeps of the good images' patch features.

Every good image is seen in its 4 rotations x horizontal flip; a random 100k of their patches are standardised
(the deep channels as they are, the grey statistics weighted to spread as much as the deep ones together) and
a greedy k-centre selection on a 24-d random projection keeps 1024 of them, each with its local radius (the mean
squared distance to its 3 nearest other entries, floored at half the median). scoring.py makes constants of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import openvino as ov

from appliance.training.features import INTENSITY_WINDOWS, infer_all

# The 4 rotations x horizontal flip: brick 0.98 -> 0.99 (MODELS.md 5), and a part may lie either way.
AUGMENTATIONS = 8
SUBSAMPLE = 100_000
BANK_SIZE = 1024  # no accuracy gain past ~1000 (MODELS.md 5); 2048 entries take 10.7 ms per image
PROJECTION_DIMS = 24
RADIUS_NEIGHBOURS = 3
RADIUS_FLOOR = 0.5  # x the median radius^2: an entry in a dense cluster must not make every distance huge


def augmentations(image: np.ndarray) -> np.ndarray:
    """The 8 rotations x flips of a square image, the original first."""
    flipped = image[:, ::-1]
    views = [np.rot90(view, turns) for view in (image, flipped) for turns in range(4)]
    return np.ascontiguousarray(np.stack(views[:AUGMENTATIONS]))


def greedy_k_centre(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``count`` points chosen greedily, each the farthest from those already chosen.

    Each step is |x|^2 - 2 x.c + |c|^2 over all points, with the points stored dimension-major (24 x N) and
    the product done by ``einsum``'s own loop: 0.34 ms per step for 100k points. OpenBLAS's threaded gemv
    took 4.5-5.5 ms per step when other processes used the 2 cores (1024 steps: 5 s instead of 0.4 s).
    """
    count = min(count, len(points))
    by_dimension = np.ascontiguousarray(points.T)
    norms = np.einsum("ji,ji->i", by_dimension, by_dimension)
    chosen = np.empty(count, np.int64)
    chosen[0] = int(rng.integers(len(points)))
    nearest = np.full(len(points), np.inf, np.float32)
    step = np.empty(len(points), np.float32)
    for index in range(1, count + 1):
        latest = chosen[index - 1]
        np.einsum("ji,j->i", by_dimension, points[latest] * np.float32(-2.0), out=step)
        step += norms
        step += norms[latest]
        np.minimum(nearest, step, out=nearest)
        if index < count:
            chosen[index] = int(np.argmax(nearest))
    return chosen


def local_radius2(entries: np.ndarray) -> np.ndarray:
    norms = (entries.astype(np.float64) ** 2).sum(1)
    squared = norms[:, None] + norms[None, :] - 2.0 * entries.astype(np.float64) @ entries.T.astype(np.float64)
    np.fill_diagonal(squared, np.inf)
    neighbours = min(RADIUS_NEIGHBOURS, len(entries) - 1)
    if neighbours < 1:
        return np.ones(len(entries), np.float32)
    closest = np.partition(np.maximum(squared, 0.0), neighbours - 1, axis=1)[:, :neighbours]
    radius2 = closest.mean(1)
    floor = RADIUS_FLOOR * float(np.median(radius2))
    return np.maximum(radius2, max(floor, 1e-6)).astype(np.float32)



@dataclass
class Bank:
    """What training learned; everything here becomes a constant of the scoring graph."""

    entries: np.ndarray  # K x C, standardised feature space
    radius2: np.ndarray  # K
    scale: np.ndarray  # C: standardised = raw * scale + offset
    offset: np.ndarray  # C
    source: np.ndarray  # K: index of the training image each entry came from (for leave-one-out scores)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(C+1) x K matrix and K bias so that [f, |f|^2] @ W + b = |f - e_k|^2 / r_k^2 for every entry k."""
        inverse = (1.0 / self.radius2).astype(np.float64)
        entries = self.entries.astype(np.float64)
        matrix = np.concatenate([-2.0 * entries.T * inverse, inverse[None, :]], axis=0)
        bias = (entries * entries).sum(1) * inverse
        return matrix.astype(np.float32), bias.astype(np.float32)


@dataclass
class Extracted:
    """What one pass over the augmented training views keeps (never all 655k patches at once: 173 MB)."""

    patches: np.ndarray  # P x C raw features, a random share of every view
    source: np.ndarray  # P: the training image each patch came from
    total: np.ndarray  # C: sum over every patch of every view
    total_square: np.ndarray  # C: sum of squares
    count: int  # patches summed
    originals: dict[int, np.ndarray]  # image index -> C x G^2 features of the unaugmented view



def extract(extractor: ov.CompiledModel, images: list[np.ndarray], grid: int, leave_out: set[int],
            rng: np.random.Generator) -> Extracted:
    """Features of the 8 views of every image (``extractor``: features.feature_model compiled), one view per
    request; a random share of each view's patches is kept, and the whole unaugmented view of ``leave_out``."""
    views = len(images) * AUGMENTATIONS
    per_view = min(grid * grid, max(1, math.ceil(SUBSAMPLE / views)))
    # Drawn here, not in the callbacks, so the bank does not depend on the order requests finish in.
    picks = [rng.choice(grid * grid, per_view, replace=False) for _ in range(views)]
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None] | None] = [None] * views

    def collect(key: int, output: np.ndarray) -> None:
        flat = output.reshape(-1, grid * grid)
        original = flat.copy() if key % AUGMENTATIONS == 0 and key // AUGMENTATIONS in leave_out else None
        results[key] = (flat[:, picks[key]].T.copy(), flat.sum(1, dtype=np.float64),
                        np.einsum("cp,cp->c", flat, flat, dtype=np.float64), original)

    infer_all(extractor, (view for image in images for view in augmentations(image)), collect)
    done = [result for result in results if result is not None]
    if len(done) != views:
        raise RuntimeError(f"feature extraction returned {len(done)} of {views} views")
    return Extracted(
        patches=np.concatenate([result[0] for result in done]),
        source=np.repeat(np.arange(len(images), dtype=np.int32), AUGMENTATIONS * per_view),
        total=np.sum([result[1] for result in done], axis=0),
        total_square=np.sum([result[2] for result in done], axis=0),
        count=views * grid * grid,
        originals={key // AUGMENTATIONS: result[3] for key, result in enumerate(done) if result[3] is not None})


def standardisation(extracted: Extracted) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel: deep channels as they are; each intensity channel standardised over every
    training patch, then weighted so that the intensity channels together spread as much as the deep ones."""
    mean = extracted.total / extracted.count
    variance = np.maximum(extracted.total_square / extracted.count - mean * mean, 1e-12)
    intensity = 2 * len(INTENSITY_WINDOWS)
    weight = math.sqrt(variance[:-intensity].sum() / intensity)
    scale = np.ones(len(mean), np.float64)
    offset = np.zeros(len(mean), np.float64)
    scale[-intensity:] = weight / np.sqrt(variance[-intensity:])
    offset[-intensity:] = -mean[-intensity:] * scale[-intensity:]
    return scale.astype(np.float32), offset.astype(np.float32)


def build_bank(extracted: Extracted, rng: np.random.Generator) -> Bank:
    scale, offset = standardisation(extracted)
    patches = extracted.patches * scale + offset
    source = extracted.source
    if len(patches) > SUBSAMPLE:
        subset = rng.choice(len(patches), SUBSAMPLE, replace=False)
        patches, source = patches[subset], source[subset]
    # Greedy k-centre on a random projection: distances survive it well enough to pick centres, 3x cheaper.
    projection = rng.standard_normal((patches.shape[1], PROJECTION_DIMS)).astype(np.float32)
    projection /= math.sqrt(PROJECTION_DIMS)
    chosen = greedy_k_centre(np.ascontiguousarray(patches @ projection), BANK_SIZE, rng)
    entries = patches[chosen]
    return Bank(entries, local_radius2(entries), scale, offset, source[chosen])

