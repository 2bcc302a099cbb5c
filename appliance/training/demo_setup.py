"""Set up the demo project that `make run` serves: write its camera frames, then train its anomaly model.

    python -m appliance.training.demo_setup projects/demo [--retrain]

Writes ``images/good`` (12 frames the model learns from), ``images/bad`` (6 defective frames, one of each
defect kind and a second scratch) with their ``images/masks``, and ``images/check`` (4 fresh good frames of
another seed, never trained on), unless ``images/good`` is already there. Then, when the project's model
``parts`` has no current version (or ``--retrain``), trains it from ``images/good`` with `appliance train
anomaly`: the threshold is calibrated from the good frames only, so the bad frames stay an honest check.
Both steps are skipped when done, so `make run` costs ~2 s only the first time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2

from appliance.runtime.store import read_current
from appliance.training import anomaly
from appliance.training.demo_parts import good_parts, write_demo_images

MODEL = "parts"
TRAIN_GOOD, BAD, CHECK_GOOD = 12, 6, 4
SEED, CHECK_SEED = 0, 1


def write_frames(images: Path) -> None:
    write_demo_images(images, TRAIN_GOOD, BAD, seed=SEED)
    (images / "check").mkdir(exist_ok=True)
    for index, frame in enumerate(good_parts(CHECK_GOOD, seed=CHECK_SEED)):
        if not cv2.imwrite(str(images / "check" / f"good_{index:03d}.png"), frame):
            raise OSError(f"cannot write {images / 'check'}")


def set_up(project_dir: Path, retrain: bool = False, backbone: Path | None = None) -> int:
    """Frames and model for ``project_dir``; returns the exit code of the training (0 when nothing to do)."""
    images = project_dir / "images"
    if not (images / "good").is_dir():
        write_frames(images)
        print(f"wrote demo frames to {images}/{{good,bad,masks,check}}")
    model_dir = project_dir / "models" / MODEL
    if read_current(model_dir) is not None and not retrain:
        print(f"{model_dir} has version {read_current(model_dir)}; `--retrain` trains a new one")
        return 0
    argv = ["--good", str(images / "good"), "--out", str(model_dir)]
    if backbone is not None:
        argv += ["--backbone", str(backbone)]
    return anomaly.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project_dir", type=Path)
    parser.add_argument("--retrain", action="store_true", help="train a new version even if one is current")
    args = parser.parse_args(argv)
    return set_up(args.project_dir, args.retrain)


if __name__ == "__main__":
    sys.exit(main())
