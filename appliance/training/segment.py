"""On-device surface segmentation (PEKAT's Surface Detector): a per-pixel classifier from a few annotated images.

The features are the anomaly model's (features.py: EfficientNet-lite0 taps and local grey statistics on a
stride-4 grid, from the pinned wheel); a softmax classifier over them is fitted here with numpy, every cell
labelled by the class covering most of it in the mask. The scoring is one OpenVINO graph: u8 NHWC BGR frame
in, ``classes`` (1 x C x size x size probabilities, class 0 = background) out, which segment@1 runs.

    appliance train segment --images DIR --masks DIR --labels scratch,spot --out MODEL_DIR [--val-images DIR
        --val-masks DIR]

Masks are PNGs named like the images, pixel value = class id (0 background, 1 = the first label, ...).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openvino as ov
import openvino.opset13 as ops

from appliance.training import TrainingError
from appliance.training.features import (
    GRID_STRIDE,
    compile_f32,
    constant,
    feature_model,
    infer_all,
    patch_features,
    read_backbone,
)
from appliance.training.images import prepare_image

OUTPUT = "classes"
STEPS = 400
LEARNING_RATE = 0.5
L2 = 1e-3
# Background cells outnumber defect cells by far; more than this many per foreground cell add nothing.
BACKGROUND_PER_FOREGROUND = 4
PALETTE = ("#ff0000", "#ffa500", "#ffff00", "#00ff00", "#00ffff", "#0000ff", "#ff00ff")


@dataclass
class TrainedSegmenter:
    model: ov.Model
    labels: list[str]  # without the background
    size: int
    metrics: dict[str, Any] = field(default_factory=dict)


def _views(image: np.ndarray, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 4 rotations of the image and its mask, and of their mirror image."""
    pairs = []
    for flip in (False, True):
        source_image, source_mask = (image[:, ::-1], mask[:, ::-1]) if flip else (image, mask)
        for turns in range(4):
            pairs.append((np.ascontiguousarray(np.rot90(source_image, turns)),
                          np.ascontiguousarray(np.rot90(source_mask, turns))))
    return pairs


def _cell_labels(mask: np.ndarray, classes: int, grid: int) -> np.ndarray:
    """The class covering most of each grid cell (G*G,), from a size x size class-id mask."""
    one_hot = (mask[:, :, None] == np.arange(classes)[None, None, :]).astype(np.float32)
    fractions = cv2.resize(one_hot, (grid, grid), interpolation=cv2.INTER_AREA)
    return fractions.reshape(-1, classes).argmax(1)


def _features(extractor: ov.CompiledModel, frames: list[np.ndarray]) -> list[np.ndarray]:
    """(G*G, C) features of each frame (size x size u8 BGR), the device's optimal number of requests in flight."""
    results: list[np.ndarray | None] = [None] * len(frames)

    def collect(index: int, output: np.ndarray) -> None:
        results[index] = output.reshape(output.shape[0], -1).T.copy()

    infer_all(extractor, frames, collect)
    if any(result is None for result in results):
        raise RuntimeError("feature extraction lost a view")
    return [result for result in results if result is not None]


def _fit_softmax(features: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (D x C) and bias (C) of a multinomial logistic regression, class-balanced, full-batch gradient
    descent with L2 on standardised features: convex, so the same data give the same model."""
    rng = np.random.default_rng(seed)
    count = np.bincount(labels, minlength=classes).astype(np.float64)
    present = count > 0
    weight_of_class = np.where(present, count.sum() / (present.sum() * np.maximum(count, 1)), 0.0)
    sample_weight = weight_of_class[labels] / len(labels)
    targets = np.eye(classes)[labels]
    weights = rng.normal(0, 0.01, (features.shape[1], classes))
    bias = np.zeros(classes)
    for _ in range(STEPS):
        logits = features @ weights + bias
        logits -= logits.max(1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(1, keepdims=True)
        error = (probabilities - targets) * sample_weight[:, None]
        weights -= LEARNING_RATE * (features.T @ error + L2 * weights)
        bias -= LEARNING_RATE * error.sum(0)
    return weights.astype(np.float32), bias.astype(np.float32)


def _scoring_model(backbone: ov.Model, size: int, mean: np.ndarray, std: np.ndarray, weights: np.ndarray,
                   bias: np.ndarray) -> ov.Model:
    parameter, features = patch_features(backbone, size)
    channels, classes = weights.shape
    standard = ops.divide(ops.subtract(features, constant(mean.reshape(1, channels, 1, 1))),
                          constant(std.reshape(1, channels, 1, 1)))
    logits = ops.add(ops.convolution(standard, constant(weights.T.reshape(classes, channels, 1, 1)), [1, 1], [0, 0],
                                     [0, 0], [1, 1]), constant(bias.reshape(1, classes, 1, 1)))
    probabilities = ops.softmax(logits, 1)
    upsampled = ops.interpolate(probabilities, constant([size, size], np.int64), "linear_onnx", "sizes",
                                coordinate_transformation_mode="half_pixel", axes=constant([2, 3], np.int64))
    result = ops.result(upsampled)
    for output in (upsampled.output(0), result.output(0)):
        output.get_tensor().set_names({OUTPUT})
    return ov.Model([result], [parameter], "surface_segmenter")


def train_segmenter(images: list[np.ndarray], masks: list[np.ndarray], labels: list[str], backbone_xml: Path, *,
                    size: int = 256, seed: int = 0) -> TrainedSegmenter:
    """Fit the classifier on every rotation and mirror image of the annotated images; masks hold class ids."""
    if not images or len(images) != len(masks):
        raise TrainingError(f"{len(images)} images and {len(masks)} masks: need as many, at least one")
    classes = len(labels) + 1
    started = time.perf_counter()
    backbone = read_backbone(backbone_xml)
    extractor = compile_f32(feature_model(backbone, size, "segment_features"), PERFORMANCE_HINT="THROUGHPUT")
    grid = size // GRID_STRIDE
    frames, cell_labels = [], []
    for image, mask in zip(images, masks, strict=True):
        if mask.max() >= classes:
            raise TrainingError(f"a mask holds class {int(mask.max())}; labels are 1..{len(labels)}")
        resized_mask = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        for view, view_mask in _views(prepare_image(image, size), resized_mask):
            frames.append(view)
            cell_labels.append(_cell_labels(view_mask, classes, grid))
    every_feature = np.concatenate(_features(extractor, frames))
    every_label = np.concatenate(cell_labels)
    rng = np.random.default_rng(seed)
    foreground = np.flatnonzero(every_label > 0)
    background = np.flatnonzero(every_label == 0)
    if len(foreground) == 0:
        raise TrainingError("no mask marks any pixel: nothing to learn")
    keep = min(len(background), BACKGROUND_PER_FOREGROUND * len(foreground))
    chosen = np.concatenate([foreground, rng.choice(background, keep, replace=False)])
    chosen_features, chosen_labels = every_feature[chosen].astype(np.float64), every_label[chosen]
    mean = chosen_features.mean(0)
    std = np.maximum(chosen_features.std(0), 1e-6)
    weights, bias = _fit_softmax((chosen_features - mean) / std, chosen_labels, classes, seed)
    model = _scoring_model(backbone, size, mean.astype(np.float32), std.astype(np.float32), weights, bias)
    metrics = {"train_seconds": round(time.perf_counter() - started, 3), "images": len(images),
               "cells": int(len(chosen)), "cells_per_class": np.bincount(chosen_labels, minlength=classes).tolist()}
    return TrainedSegmenter(model, list(labels), size, metrics)


def evaluate(trained: TrainedSegmenter, images: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, Any]:
    """Pixel IoU per class (and its mean over the defect classes) at the model's input size, argmax decision."""
    compiled = compile_f32(trained.model)
    request = compiled.create_infer_request()
    classes = len(trained.labels) + 1
    intersection, union = np.zeros(classes), np.zeros(classes)
    for image, mask in zip(images, masks, strict=True):
        predicted = request.infer({0: prepare_image(image, trained.size)[None]})[OUTPUT][0].argmax(0)
        truth = cv2.resize(mask.astype(np.uint8), (trained.size, trained.size), interpolation=cv2.INTER_NEAREST)
        for index in range(classes):
            intersection[index] += np.sum((predicted == index) & (truth == index))
            union[index] += np.sum((predicted == index) | (truth == index))
    iou = {name: float(intersection[i] / union[i]) if union[i] else math.nan
           for i, name in enumerate(["background", *trained.labels])}
    defects = [iou[name] for name in trained.labels if not math.isnan(iou[name])]
    return {"iou": iou, "mean_defect_iou": float(np.mean(defects)) if defects else math.nan}
