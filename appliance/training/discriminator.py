"""A learned discriminator over the frozen patch features: the anomaly model for stochastic surfaces.

The memory bank (bank.py) asks "has a good image had a patch like this one?", and on grass, gravel, granite or felt
the honest answer is often "no" for good patches too: their own variation is as far from the bank as a defect.
Here a small MLP learns what a *defect* looks like against this surface instead (SimpleNet's idea, with DRAEM's
image-space negatives): every good image is also drawn with synthetic anomalies (``synthetic_anomalies``: blobs,
strokes and patches, shifted, re-lit, smeared, emptied or filled with a foreign noise texture), and the MLP is
trained in numpy, in about a second, to tell the cells those anomalies cover from the cells of the good views.

Everything after the u8 frame stays one OpenVINO graph with the anomaly@1 contract of scoring.py (``input`` in,
``anomaly_map`` and ``pred_score`` out, NG when ``pred_score >= threshold``): the patch features (features.py, the
frame optionally enlarged first), a 1x1 convolution, LeakyReLU and a 1x1 convolution (the MLP, its weights
constants with the standardisation folded in), a Gaussian blur of the logit map, bilinear upsampling and a
softplus, so the map is positive like a distance and the heat map of anomaly@1 reads it unchanged.

Two modes (``MODES``), measured by bench/anomaly_quality.py over nine surfaces (docs/anomaly.md has the tables and
the levers that lost):

* ``fast``: the frame as it is (64 x 64 cells at 256), every good image in its 8 rotations x flips; 3.4-3.9 s from
  20 images, 7.9 ms per image quiet (the bank: 12.7 ms); mean image AUROC 0.860 against the bank's 0.753;
* ``thorough``: the frame enlarged 1.5x inside the graph (96 x 96 cells of 2.7 px at 256), so thin scratches and
  small spots fill more of a cell; 2.3x the backbone's work, so fewer views per image when there are many: 30-34 s
  from 200 images, 21 ms per image quiet; 0.883. (2x gained more in a study, and took 41-55 ms.)

Thresholds come from good images the MLP never saw (``CALIBRATION_SHARE`` of them held out, each scored in its 8
rotations x flips): unlike the bank's leave-one-out, an MLP scores its own training images lower than new ones, and
by how much depends on the surface. The pixel threshold is what one of their pixels in a thousand reaches
(``REGION_PIXEL_SHARE``), far below the image threshold: anomaly@1 keeps the regions above it that reach the image
threshold, so a thin scratch whose map dips between two peaks stays one rectangle.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openvino as ov
import openvino.opset13 as ops

from appliance.training import TrainingError
from appliance.training.anomaly import TrainedAnomaly, check_inputs, validated
from appliance.training.bank import augmentations
from appliance.training.features import (
    BORDER_PAD,
    FEATURE_CHANNELS,
    GRID_STRIDE,
    INPUT_NAME,
    INTENSITY_WINDOWS,
    TAPS,
    backbone_name,
    compile_f32,
    constant,
    deep_taps,
    feature_extractor,
    grey_statistics,
    infer_all,
    read_backbone,
)
from appliance.training.images import prepare_image
from appliance.training.metrics import stats
from appliance.training.scoring import anomaly_model
from appliance.training.surfaces import smooth_noise


@dataclass(frozen=True)
class Mode:
    """One training recipe of the discriminator; ``MODES`` holds the two a user chooses from."""

    name: str
    upscale: float  # the frame is enlarged this many times inside the graph, before the backbone
    max_views: int  # augmented views of the good images at most (extraction time is linear in them)
    hidden: int  # MLP width
    steps: int  # Adam steps of ``batch`` cells, half good, half anomalous
    batch: int
    learning_rate: float
    weight_decay: float  # L2 on the weights: how much the MLP may bend round single training cells
    map_sigma: float  # Gaussian blur of the logit map, in px of the model's input


FAST = Mode("fast", upscale=1, max_views=160, hidden=128, steps=1000, batch=512, learning_rate=2e-3,
            weight_decay=1e-4, map_sigma=4.0)
THOROUGH = Mode("thorough", upscale=1.5, max_views=640, hidden=128, steps=2000, batch=512, learning_rate=2e-3,
                weight_decay=1e-4, map_sigma=4.0)
MODES: dict[str, Mode] = {mode.name: mode for mode in (FAST, THOROUGH)}

# Good images kept out of the MLP's training to set the threshold with (at least 2, when there are 6 or more; 20
# are plenty for the fit, and the rest train).
CALIBRATION_SHARE = 0.25
CALIBRATION_MIN_IMAGES = 6
CALIBRATION_MAX_IMAGES = 20
# Threshold: a Gumbel (extreme value) fit of the calibration images' scores, read at this false-reject rate, and
# never below the highest calibration score plus half its distance to the median (metrics.good_only_thresholds).
# Measured on fast models of 6 surfaces (bench/anomaly_quality.py): at 1 %, 0-40 % of the held-out good crops were
# rejected and 31-94 % of the defective ones flagged; at 0.1 %, 0-7 % and 26-91 %.
TARGET_FALSE_REJECTS = 0.001
# Pixel threshold (regions; anomaly@1 keeps those that reach the image threshold): the share of the calibration
# views' map pixels above it. Measured on `fast` models (docs/anomaly.md, "Regions"): cut at the image threshold, the
# flagged defects of brick, grass, sand, foam and felt had a rectangle on their centre in 178 of 204 images and the
# demo's thin scratch fell apart; at the 99.9th percentile of good pixels, 201 of 204, one rectangle per defect.
REGION_PIXEL_SHARE = 0.001
# Cells sampled per good view (fewer when there are many views: at most GOOD_CELLS in all), and anomalies drawn
# into each view's anomalous twin.
CELLS_PER_VIEW = 1024
GOOD_CELLS = 300_000
ANOMALIES_PER_VIEW = (1, 4)
# A cell is anomalous when the anomalies cover this share of it, good when none is within this many px.
ANOMALOUS_COVER = 0.15
GOOD_MARGIN_PX = 8
GOOD_CELLS_PER_ANOMALOUS_VIEW = 256
LEAKY_SLOPE = 0.2


# ---------------------------------------------------------------------------------------------------------
# Synthetic anomalies (image space)

SHAPES = ("blob", "stroke", "patch")
FILLS = ("shift", "gain", "texture", "flat", "blur")
_SHAPE_SHARES = (0.45, 0.3, 0.25)
_FILL_SHARES = (0.3, 0.2, 0.25, 0.15, 0.1)


def _blob(rng: np.random.Generator, side: float) -> np.ndarray:
    """An irregular ellipse of about ``side`` px, as coverage in 0..1 of its own square window."""
    window = int(math.ceil(side)) + 8
    centre = (window - 1) / 2
    ys, xs = np.mgrid[0:window, 0:window].astype(np.float32) - centre
    major = side / 2 * rng.uniform(0.6, 1.0)
    minor = major * rng.uniform(0.35, 1.0)
    angle = rng.uniform(0, np.pi)
    along = (xs * np.cos(angle) + ys * np.sin(angle)) / major
    across = (-xs * np.sin(angle) + ys * np.cos(angle)) / minor
    wobble = smooth_noise(rng, (window, window), max(1.0, side / 6)) * rng.uniform(0.0, 0.35)
    return (np.sqrt(along * along + across * across) + wobble < 1.0).astype(np.float32)


def _stroke(rng: np.random.Generator) -> np.ndarray:
    """A gently curved anti-aliased line 1-4 px wide and 12-90 px long, in its own window."""
    length = rng.uniform(12, 90)
    steps = 8
    angle = rng.uniform(0, 2 * np.pi)
    turn = rng.normal(0, 0.12)
    points = [(0.0, 0.0)]
    for _ in range(steps):
        angle += turn
        x, y = points[-1]
        points.append((x + np.cos(angle) * length / steps, y + np.sin(angle) * length / steps))
    path = np.array(points)
    thickness = int(rng.choice([1, 1, 2, 2, 3, 4]))
    margin = thickness + 3
    path -= path.min(0) - margin
    height, width = (np.ceil(path.max(0)) + margin + 1).astype(int)[::-1]
    canvas = np.zeros((height, width), np.float32)
    # Fixed-point coordinates (shift 4) keep the sub-pixel positions of the anti-aliased line.
    cv2.polylines(canvas, [np.round(path * 16).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA, shift=4)
    return np.clip(canvas * 1.5, 0, 1)


def _patch(rng: np.random.Generator) -> np.ndarray:
    """A rotated rectangle of 8-44 x 8-44 px, in its own window."""
    sides = (rng.uniform(8, 44), rng.uniform(8, 44))
    window = int(math.ceil(math.hypot(*sides))) + 4
    canvas = np.zeros((window, window), np.float32)
    box = cv2.boxPoints(((window / 2, window / 2), sides, rng.uniform(0, 180)))
    cv2.fillPoly(canvas, [np.round(box * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=4)
    return canvas


def _fill(region: np.ndarray, image: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """What the anomaly turns ``region`` (h x w x channels, float, a window of ``image``) into, before blending by
    its coverage."""
    height, width = region.shape[:2]
    if kind == "shift":
        return region + float(rng.choice([-1.0, 1.0]) * rng.uniform(15, 100))
    if kind == "gain":
        return region * float(1 + rng.choice([-1.0, 1.0]) * rng.uniform(0.12, 0.5))
    if kind == "texture":
        if rng.random() < 0.5:
            # CutPaste: the surface itself, turned and taken from elsewhere, re-lit. Measured: without it grass
            # fell from 0.69 to 0.53 image AUROC (6 stochastic surfaces: 0.795 -> 0.768).
            source = np.rot90(image, int(rng.integers(1, 4)))
            top = int(rng.integers(0, source.shape[0] - height + 1))
            left = int(rng.integers(0, source.shape[1] - width + 1))
            pasted = source[top:top + height, left:left + width]
            return pasted * float(rng.uniform(0.7, 1.3)) + float(rng.uniform(-30, 30))
        noise = smooth_noise(rng, (height, width), rng.uniform(0.5, 4)) * rng.uniform(8, 50) + rng.uniform(40, 215)
        return np.repeat(noise[:, :, None], region.shape[2], axis=2)
    if kind == "flat":
        grain = smooth_noise(rng, (height, width), 0.5)[:, :, None] * rng.uniform(0, 6)
        return np.full_like(region, rng.uniform(0, 255)) + grain
    blurred = cv2.GaussianBlur(region, (0, 0), rng.uniform(1.5, 4), borderType=cv2.BORDER_REFLECT_101)
    return blurred.reshape(region.shape)


def synthetic_anomalies(image: np.ndarray, rng: np.random.Generator, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` (u8 H x W grey or H x W x 3) with ``count`` synthetic anomalies, and their coverage
    (f32 H x W, 0..1: how much of each pixel the anomalies replaced).

    Each anomaly is a shape (an irregular blob 4-40 px, a curved stroke 1-4 px wide, a rotated rectangle) with a
    hard or soft edge, filled one of five ways: its intensity shifted by 15-100 grey levels, scaled by 12-50 %,
    replaced by the surface itself turned and taken from elsewhere (CutPaste) or by a noise texture, emptied to
    one grey level, or blurred. It is deliberately generic and
    independent of the benchmark's defects (defects.py): the MLP should learn "not this surface", not five shapes.
    Seeded by ``rng`` alone.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"synthetic_anomalies needs a u8 grey or colour image, got {image.dtype} {image.shape}")
    work = image.astype(np.float32)
    if work.ndim == 2:
        work = work[:, :, None]
    height, width = work.shape[:2]
    coverage = np.zeros((height, width), np.float32)
    for _ in range(count):
        shape = SHAPES[int(rng.choice(len(SHAPES), p=_SHAPE_SHARES))]
        if shape == "blob":
            alpha = _blob(rng, float(np.exp(rng.uniform(np.log(4), np.log(40)))))
        elif shape == "stroke":
            alpha = _stroke(rng)
        else:
            alpha = _patch(rng)
        softness = float(rng.choice([0.0, 0.0, 0.7, 1.5, 3.0]))
        if softness > 0:
            blurred: np.ndarray = cv2.GaussianBlur(alpha, (0, 0), softness)
            alpha = blurred / max(float(blurred.max()), 1e-6)
        alpha = alpha[:height, :width]
        top = int(rng.integers(0, height - alpha.shape[0] + 1))
        left = int(rng.integers(0, width - alpha.shape[1] + 1))
        region = work[top:top + alpha.shape[0], left:left + alpha.shape[1]]
        target = _fill(region, work, rng, FILLS[int(rng.choice(len(FILLS), p=_FILL_SHARES))])
        region += alpha[:, :, None] * (target - region)
        covered = coverage[top:top + alpha.shape[0], left:left + alpha.shape[1]]
        np.maximum(covered, alpha, out=covered)
    out = np.clip(np.rint(work), 0, 255).astype(np.uint8)
    return (out[:, :, 0] if image.ndim == 2 else out), coverage


# ---------------------------------------------------------------------------------------------------------
# The feature graph, optionally on an enlarged frame


def upscaled_patch_features(backbone: ov.Model, size: int, upscale: float = 1.0) -> tuple[ops.Parameter, ov.Output]:
    """features.patch_features with the frame enlarged ``upscale`` times (bilinear) before the backbone.

    A new u8 NHWC BGR input ``input`` (1 x size x size x 3); raw patch features 1 x 66 x G x G with
    G = size * upscale / 4, so a cell is 4 / upscale px of the input. The mirror padding (BORDER_PAD px) and the
    grey statistics' windows (INTENSITY_WINDOWS) keep their size in input pixels. With ``upscale`` 1 the graph
    is features.patch_features' own (a test checks the outputs are equal).
    """
    padded = size + 2 * BORDER_PAD
    inner_size = round(padded * upscale)
    first = BORDER_PAD * upscale / GRID_STRIDE
    if upscale < 1 or inner_size % GRID_STRIDE or (size * upscale) % GRID_STRIDE or first != int(first):
        raise TrainingError(f"upscale {upscale} does not put a {size} px frame on whole {GRID_STRIDE} px cells; "
                            f"use 1, 1.5 or 2 with a size that is a multiple of 8")
    extractor = feature_extractor(backbone, list(TAPS), (inner_size, inner_size))
    inner = extractor.get_parameters()[0]
    parameter = ops.parameter([1, size, size, 3], ov.Type.u8, name=INPUT_NAME)
    parameter.output(0).get_tensor().set_names({INPUT_NAME})
    pads = constant([0, BORDER_PAD, BORDER_PAD, 0], np.int64)
    frame = ops.pad(parameter.output(0), pads, pads, "reflect").output(0)
    frame_f32 = ops.convert(frame, ov.Type.f32).output(0)
    if upscale == 1:
        for consumer in inner.output(0).get_target_inputs():
            consumer.replace_source_output(frame)
        seen = frame_f32
    else:
        seen = ops.interpolate(frame_f32, constant([inner_size, inner_size], np.int64), "linear_onnx", "sizes",
                               coordinate_transformation_mode="half_pixel",
                               axes=constant([1, 2], np.int64)).output(0)
        # The backbone's pre-processing starts by converting its u8 input to f32: the enlarged f32 frame goes in
        # after that conversion, without a round trip through u8.
        conversions = [consumer.get_node() for consumer in inner.output(0).get_target_inputs()]
        if [node.get_type_name() for node in conversions] != ["Convert"]:
            raise TrainingError("the backbone's input is not converted to f32 first; rebuild it with `make models`")
        for consumer in conversions[0].output(0).get_target_inputs():
            consumer.replace_source_output(seen)
    grid = inner_size // GRID_STRIDE
    deep = deep_taps(extractor, grid)

    # The grey statistics of the frame as the backbone sees it, every GRID_STRIDE px: windows of the same size in
    # input pixels (16 px of the input are 16 x upscale px here).
    statistics = grey_statistics(seen, [round(window_px * upscale) for window_px in INTENSITY_WINDOWS])
    features = ops.concat([deep, *statistics], 1).output(0)
    last = int(first) + round(size * upscale) // GRID_STRIDE
    features = ops.slice(features, constant([int(first)] * 2, np.int64), constant([last, last], np.int64),
                         constant([1, 1], np.int64), constant([2, 3], np.int64)).output(0)
    return parameter, features


def feature_model(backbone: ov.Model, size: int, upscale: float) -> ov.Model:
    parameter, features = upscaled_patch_features(backbone, size, upscale)
    result = ops.result(features)
    result.output(0).get_tensor().set_names({"features"})
    return ov.Model([result], [parameter], "discriminator_features")


# ---------------------------------------------------------------------------------------------------------
# The MLP, trained in numpy


@dataclass
class Discriminator:
    """The trained MLP on raw patch features: logit = w2 . leaky(W1 x + b1) + b2 (standardisation folded in)."""

    w1: np.ndarray  # C x H
    b1: np.ndarray  # H
    w2: np.ndarray  # H
    b2: float

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits of N x C raw patch features (higher: more anomalous)."""
        hidden = features @ self.w1 + self.b1
        return np.maximum(hidden, LEAKY_SLOPE * hidden) @ self.w2 + self.b2


# (setter, getter) symbol names of OpenBLAS's thread count, as numpy's wheels (scipy-openblas) and others export them.
_OPENBLAS_THREAD_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                            ("openblas_set_num_threads", "openblas_get_num_threads"))


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's matrix products on one thread inside the block, when numpy uses OpenBLAS (as its wheels do).

    The MLP's products are small (512 x 66 x 128): OpenBLAS splits them over every core and, when OpenVINO's
    workers have just run or other processes use the cores, its threads wait on each other. Measured on 2 shared
    vCPU: 3.6-30 ms per Adam step with the default threads, 1.4-2.6 ms with one. The library is found among those
    already loaded (/proc/self/maps, as threadpoolctl does); elsewhere, or without these symbols, nothing changes.
    """
    functions = None
    with contextlib.suppress(OSError):
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
        for path in paths:
            library = ctypes.CDLL(path)
            for setter, getter in _OPENBLAS_THREAD_SYMBOLS:
                if hasattr(library, setter) and hasattr(library, getter):
                    functions = (getattr(library, setter), getattr(library, getter))
                    break
            if functions:
                break
    if functions is None:
        yield
        return
    setter, getter = functions
    previous = int(getter())
    setter(1)
    try:
        yield
    finally:
        setter(previous)


def train_mlp(good: np.ndarray, anomalous: np.ndarray, rng: np.random.Generator, *, hidden: int = 128,
              steps: int = 1000, batch: int = 512, learning_rate: float = 2e-3,
              weight_decay: float = 1e-4) -> Discriminator:
    """Train C -> hidden -> 1 (LeakyReLU) with Adam on the logistic loss, each batch half good, half anomalous.

    ``good`` and ``anomalous`` are N x C raw patch features. The inputs are standardised with the good cells'
    mean and standard deviation, which are then folded into the first layer. Batches are consecutive slices of
    shuffled copies (a fancy-indexed batch per step cost as much as the step's products).
    """
    good = np.asarray(good, np.float32)
    anomalous = np.asarray(anomalous, np.float32)
    if len(good) == 0 or len(anomalous) == 0:
        raise TrainingError(f"the discriminator needs good and anomalous cells, got {len(good)} and {len(anomalous)}")
    mean = good.mean(0, dtype=np.float64).astype(np.float32)
    deviation = (good.std(0, dtype=np.float64) + 1e-6).astype(np.float32)
    half = batch // 2
    # Standardised and shuffled once; a set smaller than half a batch is repeated to fill one.
    sets = [((cells[rng.permutation(len(cells))] - mean) / deviation).astype(np.float32)
            for cells in (good, anomalous)]
    sets = [np.tile(cells, (math.ceil(half / len(cells)), 1)) if len(cells) < half else cells for cells in sets]
    channels = good.shape[1]
    weights = [rng.standard_normal((channels, hidden)).astype(np.float32) * np.float32(math.sqrt(2.0 / channels)),
               np.zeros(hidden, np.float32),
               rng.standard_normal((hidden, 1)).astype(np.float32) * np.float32(math.sqrt(2.0 / hidden)),
               np.zeros(1, np.float32)]
    first_moment = [np.zeros_like(w) for w in weights]
    second_moment = [np.zeros_like(w) for w in weights]
    labels = np.r_[np.zeros(half, np.float32), np.ones(half, np.float32)][:, None]
    x = np.empty((2 * half, channels), np.float32)
    positions = [0, 0]
    beta1, beta2 = 0.9, 0.999
    for step in range(1, steps + 1):
        for side, cells in enumerate(sets):
            if positions[side] + half > len(cells):
                positions[side] = 0
            x[side * half:(side + 1) * half] = cells[positions[side]:positions[side] + half]
            positions[side] += half
        w1, b1, w2, b2 = weights
        pre = x @ w1
        pre += b1
        act = pre * np.float32(LEAKY_SLOPE)
        np.maximum(act, pre, out=act)  # LeakyReLU: the larger of x and slope * x
        logit = act @ w2
        logit += b2
        np.clip(logit, -30, 30, out=logit)
        grad_logit = (1.0 / (1.0 + np.exp(-logit)) - labels) * np.float32(1.0 / len(labels))
        grad_pre = grad_logit @ w2.T
        grad_pre *= np.where(pre > 0, np.float32(1.0), np.float32(LEAKY_SLOPE))
        gradients = [x.T @ grad_pre + weight_decay * w1, grad_pre.sum(0), act.T @ grad_logit + weight_decay * w2,
                     grad_logit.sum(0)]
        step_size = learning_rate * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        for weight, gradient, m, v in zip(weights, gradients, first_moment, second_moment, strict=True):
            m *= beta1
            m += (1 - beta1) * gradient
            v *= beta2
            v += (1 - beta2) * gradient * gradient
            weight -= step_size * m / (np.sqrt(v) + 1e-8)
    w1, b1, w2, b2 = weights
    folded_w1 = w1 / deviation[:, None]
    folded_b1 = b1 - (mean / deviation) @ w1
    return Discriminator(folded_w1.astype(np.float32), folded_b1.astype(np.float32), w2.ravel().astype(np.float32),
                         float(b2[0]))


# ---------------------------------------------------------------------------------------------------------
# The scoring graph and its numpy twin


def _map_kernel(sigma_px: float, upscale: float) -> np.ndarray:
    sigma_cells = sigma_px * upscale / GRID_STRIDE
    size = 2 * int(round(3 * sigma_cells)) + 1
    return cv2.getGaussianKernel(size, sigma_cells).astype(np.float32).ravel()


def scoring_model(backbone: ov.Model, size: int, mode: Mode, discriminator: Discriminator) -> ov.Model:
    """input -> anomaly_map (1 x 1 x size x size) and pred_score ([1]): the anomaly@1 contract of scoring.py."""
    parameter, features = upscaled_patch_features(backbone, size, mode.upscale)
    channels, hidden = discriminator.w1.shape
    # The MLP as two 1x1 convolutions over the feature grid: no reshapes, and the CPU plugin's fast 1x1 path.
    first = ops.convolution(features, constant(discriminator.w1.T.reshape(hidden, channels, 1, 1)), [1, 1], [0, 0],
                            [0, 0], [1, 1])
    first = ops.add(first, constant(discriminator.b1.reshape(1, hidden, 1, 1)))
    activated = ops.maximum(first, ops.multiply(first, constant(LEAKY_SLOPE)))
    logits = ops.convolution(activated, constant(discriminator.w2.reshape(1, hidden, 1, 1)), [1, 1], [0, 0], [0, 0],
                             [1, 1])
    logits = ops.add(logits, constant(np.float32(discriminator.b2).reshape(1, 1, 1, 1)))
    kernel = _map_kernel(mode.map_sigma, mode.upscale)
    half = len(kernel) // 2
    padded = ops.pad(logits, constant([0, 0, half, half], np.int64), constant([0, 0, half, half], np.int64),
                     "reflect")  # = OpenCV's BORDER_REFLECT_101, which the numpy twin uses
    blurred = ops.convolution(padded, constant(kernel.reshape(1, 1, -1, 1)), [1, 1], [0, 0], [0, 0], [1, 1])
    blurred = ops.convolution(blurred, constant(kernel.reshape(1, 1, 1, -1)), [1, 1], [0, 0], [0, 0], [1, 1])
    enlarged = ops.interpolate(blurred, constant([size, size], np.int64), "linear_onnx", "sizes",
                               coordinate_transformation_mode="half_pixel", axes=constant([2, 3], np.int64))
    # Softplus: positive and increasing, so the map reads like the bank's distances (anomaly@1's heat map and
    # threshold range assume that) and ranks exactly as the logits do.
    anomaly_map = ops.softplus(enlarged)
    return anomaly_model(anomaly_map, parameter, f"anomaly_discriminator_{mode.name}")


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x).astype(np.float32)


def numpy_maps(features: np.ndarray, discriminator: Discriminator, size: int, mode: Mode) -> np.ndarray:
    """The graph's anomaly maps computed in numpy from raw features (N x C x G x G): the same logits, blur
    (reflect-101 border), bilinear half-pixel upsampling and softplus, for scoring images the graph has not
    been compiled for yet. A test checks that they agree with the graph."""
    kernel = _map_kernel(mode.map_sigma, mode.upscale)
    count, channels, grid, _ = features.shape
    maps = np.empty((count, size, size), np.float32)
    for index in range(count):
        logits = discriminator.logits(features[index].reshape(channels, -1).T).reshape(grid, grid).astype(np.float32)
        blurred = cv2.sepFilter2D(logits, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
        maps[index] = _softplus(cv2.resize(blurred, (size, size), interpolation=cv2.INTER_LINEAR))
    return maps


# ---------------------------------------------------------------------------------------------------------
# Thresholds


def gumbel_threshold(scores: Sequence[float] | np.ndarray, false_reject: float = TARGET_FALSE_REJECTS) -> float:
    """The score a new good image exceeds with probability ``false_reject`` under a Gumbel fit of ``scores``.

    An image score is the maximum of thousands of cells, and maxima follow an extreme-value law; with 5-50 good
    images the Gumbel's two parameters are fitted by moments (scale = std x sqrt(6) / pi, location = mean -
    Euler's constant x scale), which a single outlier moves less than a maximum-likelihood fit.
    """
    values = np.asarray(scores, np.float64)
    if len(values) < 2:
        raise ValueError(f"a Gumbel fit needs at least 2 scores, got {len(values)}")
    scale = float(values.std(ddof=1)) * math.sqrt(6.0) / math.pi
    location = float(values.mean()) - 0.5772156649 * scale
    return location - scale * math.log(-math.log(1.0 - false_reject))


def top_pixels(anomaly_map: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` highest values of a map (in no order): all ``pixel_quantile`` needs of it."""
    flat = anomaly_map.ravel()
    return flat.copy() if keep >= flat.size else np.partition(flat, flat.size - keep)[flat.size - keep:]


def tail_size(total: int, share: float) -> int:
    """How many top pixels of each map ``pixel_quantile`` needs: any one map may hold the whole tail."""
    return int(math.ceil(share * total)) + 2


def pixel_quantile(tops: Sequence[np.ndarray], total: int, share: float) -> float:
    """The value ``share`` of ``total`` pixels lie above, as np.percentile(all, 100 (1 - share)) gives it, from each
    map's highest ``tail_size(total, share)`` pixels only (``top_pixels``): 160 calibration maps of 256² keep 1.7M
    values instead of 10.5M, and no sort of all of them."""
    keep = min(tail_size(total, share), total)
    # The highest ``keep`` of all maps are among each map's own highest ``keep``: the full ascending order's last.
    tail = np.sort(np.concatenate(tops))[-keep:]
    if len(tail) < keep:
        raise ValueError(f"{len(tail)} top values for {total} pixels; each map must give its {keep} highest")
    offset = total - keep
    position = (1.0 - share) * (total - 1)
    below = int(math.floor(position))
    lower = tail[below - offset]
    upper = tail[min(below + 1, total - 1) - offset]
    return float(lower + (upper - lower) * (position - below))


def calibrated_threshold(scores: Sequence[float] | np.ndarray) -> tuple[float, str]:
    """(threshold, rule) from the scores of good images the model never trained on."""
    values = np.asarray(scores, np.float64)
    top = float(values.max())
    floor = top + 0.5 * (top - float(np.median(values)))
    if len(values) < 2:
        return floor, "max of held-out good scores + 0.5 (max - median)"
    fitted = gumbel_threshold(values)
    if fitted >= floor:
        return fitted, (f"Gumbel fit of {len(values)} held-out good scores at {TARGET_FALSE_REJECTS:.1%} false "
                        f"rejects")
    return floor, (f"max of {len(values)} held-out good scores + 0.5 (max - median), above their Gumbel fit at "
                   f"{TARGET_FALSE_REJECTS:.1%} false rejects")


# ---------------------------------------------------------------------------------------------------------
# Training


def _choose_views(count: int, max_views: int) -> list[tuple[int, int]]:
    """(image, augmentation) pairs: all 8 views of each image while they fit in ``max_views``, else the same
    number of views of every image (at least 1), the rotations and flips spread evenly."""
    per_image = max(1, min(8, max_views // max(1, count)))
    spread = [0, 5, 2, 7, 1, 4, 3, 6]  # identity, flipped rot90, rot180, flipped rot270, ...: mixed early
    return [(image, spread[(image + offset) % 8] if per_image < 8 else offset)
            for image in range(count) for offset in range(per_image)]


def _cells(coverage: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous, clear) cell indices of a G x G grid for one view's anomaly coverage."""
    share = cv2.resize(coverage, (grid, grid), interpolation=cv2.INTER_AREA).ravel()
    margin = 2 * GOOD_MARGIN_PX + 1
    near = cv2.dilate((coverage > 0.05).astype(np.uint8), np.ones((margin, margin), np.uint8))
    near_cells = cv2.resize(near.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA).ravel() > 0
    return np.flatnonzero(share >= ANOMALOUS_COVER), np.flatnonzero(~near_cells)


@dataclass
class _Cells:
    """Cells collected by view index: requests finish in any order, and the MLP's shuffle must not depend on it."""

    good: dict[int, np.ndarray] = field(default_factory=dict)
    clear: dict[int, np.ndarray] = field(default_factory=dict)
    anomalous: dict[int, np.ndarray] = field(default_factory=dict)


def train_discriminator(good: list[np.ndarray], backbone_xml: Path, *, mode: str | Mode = "fast", size: int = 256,
                        val_good: list[np.ndarray] | None = None, val_bad: list[np.ndarray] | None = None,
                        val_bad_masks: list[np.ndarray] | None = None, seed: int = 0,
                        progress: Callable[[str], None] | None = None) -> TrainedAnomaly:
    """Train the discriminator on good images (u8 grey or BGR, any size; resized to ``size``); calibrate thresholds.

    Returns the trainer's TrainedAnomaly, so export.save_anomaly_model stores it like a bank model; its
    ``leave_out_scores`` are the held-out calibration images' scores. ``val_*`` work as in train_anomaly.
    """
    recipe = MODES.get(mode) if isinstance(mode, str) else mode
    if recipe is None:
        raise TrainingError(f"unknown mode '{mode}'; known: {', '.join(MODES)}")
    report = progress or (lambda stage: None)
    started = time.perf_counter()
    check_inputs(good, size, val_bad, val_bad_masks)
    backbone = read_backbone(backbone_xml)
    rng = np.random.default_rng(seed)
    images = [prepare_image(image, size) for image in good]
    held_out: list[int] = []
    if len(images) >= CALIBRATION_MIN_IMAGES:
        count = min(CALIBRATION_MAX_IMAGES, max(2, round(CALIBRATION_SHARE * len(images))))
        held_out = sorted(rng.choice(len(images), count, replace=False).tolist())
    training = [index for index in range(len(images)) if index not in set(held_out)]
    grid = round(size * recipe.upscale) // GRID_STRIDE
    timings: dict[str, float] = {}

    report("features")
    mark = time.perf_counter()
    extractor = compile_f32(feature_model(backbone, size, recipe.upscale), PERFORMANCE_HINT="THROUGHPUT")
    timings["compile_features"] = time.perf_counter() - mark
    mark = time.perf_counter()
    views = [(training[image], view) for image, view in _choose_views(len(training), recipe.max_views)]
    per_view = min(grid * grid, CELLS_PER_VIEW, GOOD_CELLS // len(views))
    picks = [rng.choice(grid * grid, per_view, replace=False) for _ in views]
    augmented = {image: augmentations(images[image]) for image in sorted({image for image, _ in views})}
    frames = [augmented[image][view] for image, view in views]
    cells = _Cells()

    def collect_good(index: int, output: np.ndarray) -> None:
        cells.good[index] = output.reshape(output.shape[0], -1)[:, picks[index]].T.copy()

    infer_all(extractor, frames, collect_good)
    timings["good_features"] = time.perf_counter() - mark

    mark = time.perf_counter()
    drawn = [synthetic_anomalies(frame, rng, int(rng.integers(ANOMALIES_PER_VIEW[0], ANOMALIES_PER_VIEW[1] + 1)))
             for frame in frames]
    labelled = [_cells(coverage, grid) for _, coverage in drawn]
    clear_picks = [rng.choice(clear, min(GOOD_CELLS_PER_ANOMALOUS_VIEW, len(clear)), replace=False)
                   for _, clear in labelled]
    timings["anomalies"] = time.perf_counter() - mark
    mark = time.perf_counter()

    def collect_anomalous(index: int, output: np.ndarray) -> None:
        flat = output.reshape(output.shape[0], -1)
        cells.anomalous[index] = flat[:, labelled[index][0]].T.copy()
        cells.clear[index] = flat[:, clear_picks[index]].T.copy()

    infer_all(extractor, [image for image, _ in drawn], collect_anomalous)
    timings["anomaly_features"] = time.perf_counter() - mark

    report("discriminator")
    mark = time.perf_counter()
    order = range(len(views))
    good_cells = np.concatenate([cells.good[i] for i in order] + [cells.clear[i] for i in order])
    anomalous_cells = np.concatenate([cells.anomalous[i] for i in order])
    with single_threaded_blas():
        discriminator = train_mlp(good_cells, anomalous_cells, rng, hidden=recipe.hidden, steps=recipe.steps,
                                  batch=recipe.batch, learning_rate=recipe.learning_rate,
                                  weight_decay=recipe.weight_decay)
    timings["mlp"] = time.perf_counter() - mark
    mark = time.perf_counter()
    model = scoring_model(backbone, size, recipe, discriminator)
    timings["build_model"] = time.perf_counter() - mark

    report("threshold")
    mark = time.perf_counter()
    calibration = held_out or list(range(len(images)))
    # Every calibration image in its 8 rotations x flips, which training treats as good appearances too: 8x the
    # maxima for the Gumbel fit. Measured on the demo's parts (12 images, 3 held out): the 3 scores alone set 1.46
    # and 13 of 30 fresh good parts scored above it (up to 3.6); their 24 views set 6.3, 0 of 30 above, every one of
    # 20 defective parts still above (lowest 8.6).
    view_scores: dict[int, float] = {}
    calibration_views = [view for index in calibration for view in augmentations(images[index])]
    calibration_pixels = len(calibration_views) * size * size
    keep = tail_size(calibration_pixels, REGION_PIXEL_SHARE)
    view_tops: dict[int, np.ndarray] = {}

    def collect_score(index: int, output: np.ndarray) -> None:
        anomaly_map = numpy_maps(output[None], discriminator, size, recipe)
        view_scores[index] = float(anomaly_map.max())
        view_tops[index] = top_pixels(anomaly_map, keep)

    with single_threaded_blas():  # the MLP's products beside OpenVINO's requests: see single_threaded_blas
        infer_all(extractor, calibration_views, collect_score)
    views_per_image = len(view_scores) // len(calibration)
    all_view_scores = np.array([view_scores[i] for i in range(len(view_scores))])
    calibration_scores = all_view_scores[::views_per_image]  # each image as it is (its first view)
    threshold, rule = calibrated_threshold(all_view_scores)
    rule += f" ({views_per_image} views of each of {len(calibration)} images)"
    # Never below the rule on the images as they are: 8 views of few images can fit a narrower law than the images
    # alone (benchmark, gravel `fast`: 17 % false rejects against 0 %).
    as_they_are, rule_as_they_are = calibrated_threshold(calibration_scores)
    if as_they_are > threshold:
        threshold, rule = as_they_are, rule_as_they_are + f" (above the fit of their {views_per_image} views)"
    if not held_out:
        # Fewer than CALIBRATION_MIN_IMAGES: the training images themselves, which score lower than new ones.
        rule += " (scored in training: too few images to hold any out; expect false rejects, give --val-good)"
    # Regions: the map above what one good pixel in a thousand reaches, kept where they reach the threshold
    # (anomaly@1's hysteresis). At the image threshold the demo's scratch fell apart (REGION_PIXEL_SHARE).
    region_cut = pixel_quantile([view_tops[i] for i in range(len(view_tops))], calibration_pixels,
                                REGION_PIXEL_SHARE)
    timings["calibration"] = time.perf_counter() - mark
    metrics: dict[str, Any] = {
        "train_seconds": round(time.perf_counter() - started, 3),
        "timings": {name: round(value, 3) for name, value in timings.items()},
        "mode": recipe.name, "images": len(images), "training_images": len(training),
        "calibration_images": len(held_out), "views": len(views), "good_cells": int(len(good_cells)),
        "anomalous_cells": int(len(anomalous_cells)), "calibration_scores": stats(all_view_scores),
        "recipe": recipe_text(recipe),
    }
    # Validation with masks sets the F1-best cut; without, this cut stays below whatever threshold it chooses.
    metrics["pixel_threshold_rule"] = (
        "validation: best pixel F1 on the masks, at most the threshold" if val_bad_masks is not None else
        f"{1 - REGION_PIXEL_SHARE:.1%} quantile of the map pixels of {len(calibration_views)} "
        f"{'held-out' if held_out else 'training'} good views")
    trained = TrainedAnomaly(model, threshold, min(region_cut, threshold), metrics, size, len(images),
                             backbone_name(backbone_xml), dict(zip(calibration, map(float, calibration_scores),
                                                                   strict=True)),
                             calibration_scores=all_view_scores.tolist())
    return validated(trained, rule, val_good, val_bad, val_bad_masks, report)


def recipe_text(mode: Mode) -> str:
    """The recipe as spec.yaml's training.recipe says it."""
    frame = "the frame" if mode.upscale == 1 else f"the frame enlarged {mode.upscale}x"
    return (f"discriminator ({mode.name}): mirror pad {BORDER_PAD} px; {frame} through efficientnet_lite0 "
            f"blocks.2+blocks.4, 3x3 avg pool, grey mean/std over {'+'.join(map(str, INTENSITY_WINDOWS))} px; "
            f"MLP {FEATURE_CHANNELS}->{mode.hidden}->1 (LeakyReLU {LEAKY_SLOPE}) trained {mode.steps} Adam steps "
            f"on good cells of up to {mode.max_views} rot90 x flip views against cells of synthetic anomalies; logit "
            f"map blurred (sigma {mode.map_sigma:g} px), upsampled, softplus; score = map max; threshold from "
            f"{CALIBRATION_SHARE:.0%} of the good images held out")

