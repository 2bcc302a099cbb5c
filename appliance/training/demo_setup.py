"""Set up the demo projects: write their camera frames, then train their models on this machine.

    python -m appliance.training.demo_setup projects/demo [--retrain]               (anomaly, `make run`)
    python -m appliance.training.demo_setup projects/surface-defects --surface [--retrain]

Writes ``images/good`` (12 frames the model learns from), ``images/bad`` (6 defective frames, one of each
defect kind and a second scratch) with their ``images/masks``, and ``images/check`` (4 fresh good frames of
another seed, never trained on), unless ``images/good`` is already there. Then, when the project's model
``parts`` has no current version (or ``--retrain``), trains it from ``images/good`` with `appliance train
anomaly`: the threshold is calibrated from the good frames only, so the bad frames stay an honest check.
Both steps are skipped when done, so `make run` costs a few seconds (3-5 s on 2 cores) only the first time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from appliance.runtime.store import read_current
from appliance.training.cli import anomaly_main, segment_main
from appliance.training.defects import KINDS
from appliance.training.demo_parts import bad_parts, good_parts, write_demo_images

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
    # The discriminator (`fast`, the default everywhere): on these tiles both trainers separate fresh good parts
    # from defective ones (docs/anomaly.md "Demo parts": 30 good, 20 defective), `fast` with the wider margin and in
    # less time per frame; its regions hold each defect in one rectangle (anomaly@1's hysteresis).
    argv = ["--good", str(images / "good"), "--out", str(model_dir), "--mode", "fast"]
    if backbone is not None:
        argv += ["--backbone", str(backbone)]
    return anomaly_main(argv)


SURFACE_MODEL = "surface"
SURFACE_TRAIN, SURFACE_TRAIN_GOOD, SURFACE_CHECK = 20, 10, 5
SURFACE_SEED, SURFACE_CHECK_SEED = 3, 7


def write_surface_frames(images: Path, count: int, seed: int, folder: str, good: int = 0) -> None:
    """Defective parts (each defect kind in turn) and their masks with the kind's class id (1 = scratch, ...),
    and ``good`` parts with empty masks: they teach the classifier what the tile itself looks like."""
    frames, masks = bad_parts(count, seed)
    named = [(f"part_{i:03d}_{KINDS[i % len(KINDS)]}.png", frame, mask.astype(np.uint8) * (i % len(KINDS) + 1))
             for i, (frame, mask) in enumerate(zip(frames, masks, strict=True))]
    named += [(f"good_{i:03d}.png", frame, np.zeros(frame.shape[:2], np.uint8))
              for i, frame in enumerate(good_parts(good, seed))]
    (images / folder).mkdir(parents=True, exist_ok=True)
    (images / f"{folder}_masks").mkdir(exist_ok=True)
    for name, frame, mask in named:
        for path, image in ((images / folder / name, frame), (images / f"{folder}_masks" / name, mask)):
            if not cv2.imwrite(str(path), image):
                raise OSError(f"cannot write {path}")


def set_up_surface(project_dir: Path, retrain: bool = False, backbone: Path | None = None) -> int:
    """Frames with defect masks by kind, and the surface segmenter trained from them (PEKAT's Surface Detector)."""
    images = project_dir / "images"
    if not (images / "train").is_dir():
        write_surface_frames(images, SURFACE_TRAIN, SURFACE_SEED, "train", good=SURFACE_TRAIN_GOOD)
        write_surface_frames(images, SURFACE_CHECK, SURFACE_CHECK_SEED, "check")
        print(f"wrote surface frames to {images}/{{train,check}} with their masks")
    model_dir = project_dir / "models" / SURFACE_MODEL
    if read_current(model_dir) is not None and not retrain:
        print(f"{model_dir} has version {read_current(model_dir)}; `--retrain` trains a new one")
        return 0
    argv = ["--images", str(images / "train"), "--masks", str(images / "train_masks"), "--labels", ",".join(KINDS),
            "--val-images", str(images / "check"), "--val-masks", str(images / "check_masks"), "--out", str(model_dir)]
    if backbone is not None:
        argv += ["--backbone", str(backbone)]
    return segment_main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project_dir", type=Path)
    parser.add_argument("--surface", action="store_true", help="the surface segmentation demo, not the anomaly one")
    parser.add_argument("--retrain", action="store_true", help="train a new version even if one is current")
    args = parser.parse_args(argv)
    if args.surface:
        return set_up_surface(args.project_dir, args.retrain)
    return set_up(args.project_dir, args.retrain)


if __name__ == "__main__":
    sys.exit(main())
