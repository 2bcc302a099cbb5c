"""The anomaly trainer a user chooses by mode: ``fast`` and ``thorough`` (the discriminator), ``bank`` (memory bank).

``appliance train anomaly --mode``, the console's teaching and the demo set-up all come through ``train_by_mode``,
so a mode means the same recipe everywhere. Measured over nine surfaces (docs/anomaly.md): the discriminator's
``fast`` mode finds more than the bank on every stochastic surface and at least as much on brick, in the bank's time
budget, hence the default. ``bank`` stays for the structured parts it was made for and for comparisons; its
leave-one-out scores every good image as if unseen, which the discriminator cannot (it holds a quarter out).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.training import TrainingError
from appliance.training.anomaly import TrainedAnomaly, train_anomaly
from appliance.training.discriminator import MODES, train_discriminator

DEFAULT_MODE = "fast"
BANK_MODE = "bank"
ANOMALY_MODES: tuple[str, ...] = (*MODES, BANK_MODE)


def train_by_mode(good: list[np.ndarray], backbone_xml: Path, *, mode: str = DEFAULT_MODE, size: int = 256,
                  val_good: list[np.ndarray] | None = None, val_bad: list[np.ndarray] | None = None,
                  val_bad_masks: list[np.ndarray] | None = None, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> TrainedAnomaly:
    """Train the anomaly model ``mode`` names (one of ANOMALY_MODES) on good images; arguments as train_anomaly's.
    ``metrics["mode"]`` says which one it was."""
    if mode not in ANOMALY_MODES:
        raise TrainingError(f"unknown mode '{mode}'; known: {', '.join(ANOMALY_MODES)}")
    if mode == BANK_MODE:
        trained = train_anomaly(good, backbone_xml, size=size, val_good=val_good, val_bad=val_bad,
                                val_bad_masks=val_bad_masks, seed=seed, progress=progress)
        trained.metrics["mode"] = BANK_MODE
        return trained
    return train_discriminator(good, backbone_xml, mode=mode, size=size, val_good=val_good, val_bad=val_bad,
                               val_bad_masks=val_bad_masks, seed=seed, progress=progress)
