"""On-device anomaly training: a PatchCore-style model from a few good images, scored by ONE OpenVINO graph.

The recipe is the best configuration of MODELS.md section 5 (measured there, on 2 vCPU, against the
held-out protocol that bench/anomaly_quality.py repeats):

* EfficientNet-lite0 taps ``blocks.2`` (24 ch, stride 4) and ``blocks.4`` (40 ch, stride 8), each 3x3
  average-pooled; ``blocks.4`` bilinearly upsampled to the stride-4 grid (64x64 for 256x256): 64 channels;
* two intensity channels, the mean and standard deviation of the grey image over 16x16 px on the same
  grid, standardised and weighted so that together they spread as much as the 64 deep channels
  (the largest single gain there: stains 0.84 -> 1.00 on brick);
* the 4 rotations x horizontal flip of every good image;
* a memory bank: a random 100k patches, then greedy k-centre selection of 1024 on a 24-d random projection;
* the squared distance to each bank entry divided by that entry's local radius^2 (mean squared distance
  to its 3 nearest other entries, floored at half the median), minimum over the bank;
* the 64x64 map blurred with a Gaussian of sigma 1 cell and bilinearly upsampled; the image score is its max;
* one change, measured by bench/anomaly_quality.py (docs/anomaly.md): the frame is mirrored by 8 px on each
  side before the backbone, and the features cropped back to the frame (see ``BORDER_PAD``).

Everything after the u8 input is one OpenVINO model: ``input`` u8 NHWC BGR 1 x size x size x 3 in,
``anomaly_map`` (1 x 1 x size x size, f32) and ``pred_score`` ([1], f32) out, the names anomalib's
OpenVINO export uses, so the anomaly@1 node runs both.

``train_anomaly`` runs it end to end: features (features.py), bank (bank.py), scoring graph (scoring.py),
thresholds from leave-one-out scores of the good images, or from validation images (metrics.py).
export.py stores the result as a model version; ``appliance train anomaly`` is cli.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from appliance.training import TrainingError
from appliance.training.bank import (
    AUGMENTATIONS,
    BANK_SIZE,
    PROJECTION_DIMS,
    RADIUS_NEIGHBOURS,
    SUBSAMPLE,
    build_bank,
    extract,
)
from appliance.training.features import (
    BACKBONE,
    BORDER_PAD,
    GRID_STRIDE,
    INTENSITY_WINDOWS,
    backbone_name,
    compile_f32,
    default_backbone,
    feature_model,
    read_backbone,
)
from appliance.training.images import load_images, prepare_image, resize_mask
from appliance.training.metrics import auroc, f1_threshold, good_only_thresholds, stats, youden_threshold
from appliance.training.scoring import MAP_SIGMA, leave_out_maps, predict, scoring_model

__all__ = [
    "RECIPE", "STAGES", "TrainedAnomaly", "train_anomaly", "validate",
    # Names this module had before training/ was split into modules (bench/anomaly_quality.py and older scripts
    # import them from here): the same objects, kept importable from here.
    "AnomalyTrainingError", "auroc", "compile_anomaly_model", "default_backbone", "f1_threshold",
    "good_only_thresholds", "load_images", "predict", "prepare_image", "youden_threshold",
]
compile_anomaly_model = compile_f32
AnomalyTrainingError = TrainingError

# Leave-one-out scores are computed for at most this many training images (memory: 1 MB each at 256).
LEAVE_OUT_IMAGES = 64
RECIPE = (f"mirror pad {BORDER_PAD} px; efficientnet_lite0 blocks.2+blocks.4, 3x3 avg pool, blocks.4 upsampled to "
          f"stride 4; grey mean/std over {'+'.join(map(str, INTENSITY_WINDOWS))} px standardised; rot90 x flip; "
          f"random {SUBSAMPLE} then greedy k-centre {BANK_SIZE} on a {PROJECTION_DIMS}-d projection; distance / "
          f"local radius^2 ({RADIUS_NEIGHBOURS}-NN); Gaussian sigma {MAP_SIGMA} cell, bilinear upsampling; "
          "score = map max (MODELS.md 5)")


@dataclass
class TrainedAnomaly:
    """A trained anomaly model and what training measured."""

    model: ov.Model
    threshold: float
    pixel_threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)
    size: int = 256
    images: int = 0
    backbone: str = f"{BACKBONE}/1"
    # Training image index -> its leave-one-out score (at most LEAVE_OUT_IMAGES of them): where each good image
    # stands against the threshold, e.g. for the console's histogram.
    leave_out_scores: dict[int, float] = field(default_factory=dict)
    # The score of each validation image, in the order given: {"good": [...], "bad": [...]}.
    validation_scores: dict[str, list[float]] = field(default_factory=dict)
    # The good scores the good-only threshold was fitted on (the bank's leave-one-out scores, the discriminator's
    # held-out views): validation's stand-in for good images when it has none, and the console's histogram.
    calibration_scores: list[float] = field(default_factory=list)


# The stages train_anomaly reports to its `progress` callback as each starts.
STAGES = ("features", "bank", "threshold", "validation")


def check_inputs(good: Sequence[np.ndarray], size: int, val_bad: Sequence[np.ndarray] | None,
                 val_bad_masks: Sequence[np.ndarray] | None) -> None:
    """What every anomaly trainer refuses before it starts: too few good images, a size the feature grid cannot
    take, masks that do not pair with the bad images."""
    if len(good) < 2:
        raise TrainingError(f"need at least 2 good images, got {len(good)}")
    if size % 8 or size < 64:
        raise TrainingError(f"size must be a multiple of 8 and at least 64, got {size}")
    if val_bad_masks is not None and (val_bad is None or len(val_bad_masks) != len(val_bad)):
        raise TrainingError(f"val_bad_masks has {len(val_bad_masks)} masks for "
                            f"{0 if val_bad is None else len(val_bad)} bad images; one per bad image")


def train_anomaly(good: list[np.ndarray], backbone_xml: Path, *, size: int = 256,
                  val_good: list[np.ndarray] | None = None, val_bad: list[np.ndarray] | None = None,
                  val_bad_masks: list[np.ndarray] | None = None, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> TrainedAnomaly:
    """Train on good images (u8 grey or BGR, any size; resized to ``size`` x ``size``); calibrate thresholds.

    ``val_good`` / ``val_bad`` (and ``val_bad_masks``, bool or u8 HxW per bad image, any size) are scored by
    the finished model: they choose the thresholds and give image (and pixel) AUROC in ``metrics``.
    ``metrics["train_seconds"]`` is the wall time of everything but that validation. ``progress`` is called
    with the name of each stage (STAGES) as it starts.
    """
    report = progress or (lambda stage: None)
    started = time.perf_counter()
    check_inputs(good, size, val_bad, val_bad_masks)
    backbone = read_backbone(backbone_xml)
    rng = np.random.default_rng(seed)
    images = [prepare_image(image, size) for image in good]
    grid = size // GRID_STRIDE
    timings: dict[str, float] = {}

    report("features")
    mark = time.perf_counter()
    extractor = compile_f32(feature_model(backbone, size), PERFORMANCE_HINT="THROUGHPUT")
    timings["compile_features"] = time.perf_counter() - mark
    mark = time.perf_counter()
    leave_out = set(rng.choice(len(images), min(len(images), LEAVE_OUT_IMAGES), replace=False).tolist())
    extracted = extract(extractor, images, grid, leave_out, rng)
    timings["features"] = time.perf_counter() - mark
    report("bank")
    mark = time.perf_counter()
    bank = build_bank(extracted, rng)
    timings["coreset"] = time.perf_counter() - mark
    mark = time.perf_counter()
    model = scoring_model(backbone, size, bank)
    timings["build_model"] = time.perf_counter() - mark

    # Thresholds from leave-one-out scores, not from the training images or their augmented copies as they are:
    # those gave the bank its entries and score low. Brick, 20 crops: as they are, max 1.11 (so a threshold of
    # 1.21, failing all 30 held-out good crops, median 1.40); left out, max 1.35 (threshold 1.53, all 30 pass).
    report("threshold")
    mark = time.perf_counter()
    order = sorted(extracted.originals)
    good_maps = leave_out_maps(np.stack([extracted.originals[i] for i in order]), bank, size,
                               images=np.array(order))
    good_scores = good_maps.reshape(len(order), -1).max(1)
    threshold, pixel_threshold, rule = good_only_thresholds(good_scores)
    timings["leave_out"] = time.perf_counter() - mark
    metrics: dict[str, Any] = {
        "train_seconds": round(time.perf_counter() - started, 3),
        "timings": {name: round(value, 3) for name, value in timings.items()},
        "images": len(images), "augmented_images": len(images) * AUGMENTATIONS, "patches": extracted.count,
        "bank_size": int(len(bank.entries)), "subsample": int(min(len(extracted.patches), SUBSAMPLE)),
        "leave_out_scores": stats(good_scores),
    }
    trained = TrainedAnomaly(model, threshold, pixel_threshold, metrics, size, len(images),
                             backbone_name(backbone_xml), dict(zip(order, map(float, good_scores), strict=True)),
                             calibration_scores=good_scores.tolist())
    return validated(trained, rule, val_good, val_bad, val_bad_masks, report)


def validated(trained: TrainedAnomaly, rule: str, val_good: list[np.ndarray] | None,
              val_bad: list[np.ndarray] | None, val_bad_masks: list[np.ndarray] | None,
              report: Callable[[str], None]) -> TrainedAnomaly:
    """The last step of either trainer: ``trained`` carries its good-only thresholds and the scores they were
    fitted on; the validation images, when given, move them (`validate`); the metrics name the rule that chose
    them."""
    metrics = trained.metrics
    if val_good or val_bad:
        report("validation")
        mark = time.perf_counter()
        trained.threshold, trained.pixel_threshold, rule, trained.validation_scores = validate(
            trained.model, trained.size, np.asarray(trained.calibration_scores), val_good or [], val_bad or [],
            val_bad_masks, trained.threshold, trained.pixel_threshold, rule, metrics)
        metrics["validation_seconds"] = round(time.perf_counter() - mark, 3)
    metrics["threshold_rule"] = rule
    trained.threshold, trained.pixel_threshold = float(trained.threshold), float(trained.pixel_threshold)
    return trained


def moved_pixel_threshold(pixel_threshold: float, threshold: float, new_threshold: float) -> float:
    """The pixel threshold once the image threshold moves from ``threshold`` to ``new_threshold`` (validation, or
    an operator in the console): one that was the image threshold (the bank's good-only rule) follows it; a cut of
    its own below it (the discriminator's, from good pixels) stays, at most the new threshold, so that a flagged
    image shows at least its peak as a region."""
    return new_threshold if pixel_threshold >= threshold else min(pixel_threshold, new_threshold)


def validate(model: ov.Model, size: int, leave_out_scores: np.ndarray, val_good: list[np.ndarray],
             val_bad: list[np.ndarray], val_bad_masks: list[np.ndarray] | None, threshold: float,
             pixel_threshold: float, rule: str, metrics: dict[str, Any]) -> tuple[float, float, str, dict[str, list[float]]]:
    """Score the validation images; (image threshold, pixel threshold, rule) chosen with them and each image's
    score ({"good": [...], "bad": [...]}); AUROC in metrics.

    Bad images: the max-Youden-J cut between good and bad scores (the good-only threshold stays when J <= 0:
    sets that do not separate at all say nothing about where to cut). Masks: the F1-best pixel cut.
    """
    calibrated = threshold
    request = compile_f32(model).create_infer_request()
    good_results = [predict(request, image) for image in val_good]
    bad_results = [predict(request, image) for image in val_bad]
    good_scores = np.array([score for score, _ in good_results])
    bad_scores = np.array([score for score, _ in bad_results])
    metrics["val_good"], metrics["val_bad"] = len(val_good), len(val_bad)
    if len(good_scores):
        metrics["val_good_scores"] = stats(good_scores)
    if len(bad_scores):
        metrics["val_bad_scores"] = stats(bad_scores)
    if len(bad_scores):
        # Validation good images are the truer sample of new parts; without them, leave-one-out scores stand in.
        negatives = good_scores if len(good_scores) else np.asarray(leave_out_scores)
        metrics["image_auroc"] = round(auroc(np.r_[negatives, bad_scores],
                                             np.r_[np.zeros(len(negatives)), np.ones(len(bad_scores))]), 4)
        cut, youden = youden_threshold(negatives, bad_scores)
        metrics["youden_j"] = round(youden, 4)
        if youden > 0:
            threshold, rule = cut, "validation: max Youden J between good and bad scores"
        # else: the validation sets do not separate at all; the good-only threshold is the safer guess.
    elif len(good_scores):
        # Only good validation images: they join the leave-one-out scores of the good-only rule.
        threshold, _, rule = good_only_thresholds(np.r_[leave_out_scores, good_scores])
        rule += " and validation good scores"
    pixel_threshold = moved_pixel_threshold(pixel_threshold, calibrated, threshold)
    if val_bad_masks is not None and len(bad_results):
        maps = [m for _, m in good_results] + [m for _, m in bad_results]
        masks = [np.zeros((size, size), bool)] * len(good_results) + [resize_mask(m, size) for m in val_bad_masks]
        pixels = np.stack(maps).ravel()
        truth = np.stack(masks).ravel()
        metrics["pixel_auroc"] = round(auroc(pixels, truth), 4)
        cut, f1 = f1_threshold(pixels, truth)
        metrics["pixel_f1"] = round(f1, 4)
        pixel_threshold = cut
    # A flagged image must show at least its peak as a region.
    pixel_threshold = min(pixel_threshold, threshold)
    return threshold, pixel_threshold, rule, {"good": good_scores.tolist(), "bad": bad_scores.tolist()}

