"""On-device training: anomaly models and surface segmenters from a few images, on the pinned backbone's features.

    features.py  the OpenVINO feature graph both trainers share (backbone taps + local grey statistics)
    images.py    training images and masks read from folders, and sized for the graph
    bank.py      the anomaly memory bank: augmented views, feature extraction, coreset, local radii
    scoring.py   the anomaly scoring graph (the bank as constants), its numpy twin for leave-one-out maps
    metrics.py   AUROC, Youden's J, F1, and the good-only threshold rule
    anomaly.py   train_anomaly: the recipe end to end, with thresholds and validation
    discriminator.py  train_discriminator: an MLP over the same features against synthetic anomalies (fast, thorough)
    modes.py     train_by_mode: the trainer `--mode fast|thorough|bank` names, for the CLI, console and demo
    surfaces.py  procedural stochastic surfaces (sand, granite, felt, cast iron, foam) for the benchmark
    segment.py   train_segmenter: a per-pixel classifier on the same features
    export.py    a trained model -> a new version in the model store (runtime/store.py `publish`)
    cli.py       `appliance train anomaly ...` and `appliance train segment ...`
    demo_setup.py, demo_parts.py, defects.py: the demo projects' frames and synthetic defects
"""

from __future__ import annotations


class TrainingError(ValueError):
    """Training cannot start or finish: the message says what was wrong and what is expected."""
