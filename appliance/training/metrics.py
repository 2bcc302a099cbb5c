"""Thresholds and quality figures of anomaly models: AUROC, Youden's J, pixel F1 and the good-only rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def good_only_thresholds(good_scores: np.ndarray) -> tuple[float, float, str]:
    """(image threshold, pixel threshold, rule) from the leave-one-out scores of the good training images.

    The image threshold is the highest score plus half the distance from the median to it. The highest of N
    exchangeable scores is exceeded by a new good image with probability 1 / (N + 1); the margin covers the
    drift between the training parts and later ones. Measured with bench/anomaly_quality.py (20 training
    crops from the top half of a texture, 30 held-out good crops from the bottom half): 29-30 of 30 pass on
    brick, gravel and hubble, 27 on grass; on the demo parts, 30 of 30 fresh good parts pass and every bad one
    is flagged.

    The pixel threshold is the image threshold: the F1-best pixel cut measured on held-out maps sat there
    (brick: best 1.519 for an image threshold of 1.526, F1 0.69; demo parts: F1 0.69 there against 0.71 at
    the best cut), while the 99.9th percentile of good pixels gave F1 0.28 on brick (regions far too large).
    """
    scores = np.asarray(good_scores, np.float64)
    top = float(scores.max())
    threshold = top + 0.5 * (top - float(np.median(scores)))
    return threshold, threshold, "good-only: max + 0.5 (max - median) of leave-one-out scores"


def youden_threshold(good_scores: Sequence[float] | np.ndarray,
                     bad_scores: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(threshold, J): the cut between sorted scores with the highest TPR - FPR (NG when score >= threshold).

    Among equally good cuts the one in the widest gap between neighbouring scores wins, so a perfect
    separation puts the threshold halfway between the highest good and the lowest bad score.
    """
    good = np.asarray(good_scores, np.float64)
    bad = np.asarray(bad_scores, np.float64)
    values = np.unique(np.concatenate([good, bad]))
    if len(values) < 2:
        return float(values[0]) if len(values) else 0.0, 0.0
    cuts = (values[:-1] + values[1:]) / 2
    gaps = values[1:] - values[:-1]
    tpr = (bad[None, :] >= cuts[:, None]).mean(1)
    fpr = (good[None, :] >= cuts[:, None]).mean(1)
    youden = tpr - fpr
    best = np.flatnonzero(np.isclose(youden, youden.max()))
    pick = best[np.argmax(gaps[best])]
    return float(cuts[pick]), float(youden[pick])


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the pixel cut with the best F1 (defect pixels are a few % of all, where Youden's J
    would pick a cut that marks a large share of the good pixels too)."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    hits = np.cumsum(labels[order])
    last = np.r_[ranked[1:] != ranked[:-1], True]  # cut only between distinct values
    flagged = np.arange(1, len(ranked) + 1)[last]
    true_positive = hits[last]
    f1 = 2 * true_positive / (flagged + labels.sum())
    best = int(np.argmax(f1))
    position = np.flatnonzero(last)[best]
    below = ranked[position + 1] if position + 1 < len(ranked) else ranked[position]
    return float((ranked[position] + below) / 2), float(f1[best])


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve for ``labels`` True = anomalous, by the rank-sum (Mann-Whitney U) formula.

    Tied scores get their average rank, so a tie between a good and a bad sample counts one half.
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUROC needs both classes: {positives} anomalous, {negatives} good")
    order = np.argsort(scores, kind="mergesort")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(ranked)]
    mean_rank = (starts + 1 + ends) / 2.0  # 1-based ranks starts+1 .. ends, averaged
    ranks = np.empty(len(ranked))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def stats(values: np.ndarray) -> dict[str, float]:
    """min, median, max, mean and std, rounded for a spec or a report."""
    values = np.asarray(values, np.float64)
    return {"min": round(float(values.min()), 4), "median": round(float(np.median(values)), 4),
            "max": round(float(values.max()), 4), "mean": round(float(values.mean()), 4),
            "std": round(float(values.std()), 4)}
