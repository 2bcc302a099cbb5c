"""`appliance train anomaly ...` and `appliance train segment ...`: argument parsing and what is printed.

    appliance train anomaly --good DIR [--mode fast|thorough|bank] [--val-good DIR --val-bad DIR [--val-masks DIR]]
                            --out MODEL_DIR
    appliance train segment --images DIR --masks DIR --labels a,b --out MODEL_DIR [--val-images DIR --val-masks DIR]

Both write a new version of the model folder MODEL_DIR (`<store>/<name>`) and switch `current` to it; a running
appliance follows within 2 s. Exit 0 when written, 1 with `error: ...` on stderr when not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance.runtime.store import StoreError
from appliance.training import TrainingError
from appliance.training.export import save_anomaly_model, save_segmenter
from appliance.training.features import default_backbone
from appliance.training.images import load_anomaly_masks, load_class_masks, load_images
from appliance.training.modes import ANOMALY_MODES, DEFAULT_MODE, train_by_mode
from appliance.training.segment import evaluate, train_segmenter


def anomaly_main(argv: Sequence[str] | None = None) -> int:
    """``appliance train anomaly ...``; ``argv`` starts after ``train anomaly``. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="appliance train anomaly",
                                     description="Train an anomaly model from good images and store it as a new "
                                                 "version (MODEL_DIR/<version>/, current switched to it).")
    parser.add_argument("--good", type=Path, required=True, help="folder of good images (png/jpg/bmp)")
    parser.add_argument("--mode", choices=ANOMALY_MODES, default=DEFAULT_MODE,
                        help="fast: the learned discriminator, < 5 s from 20 images, < 10 ms per 256 px image; "
                             "thorough: the discriminator on a 1.5x enlarged frame, for thin scratches and small "
                             "spots, ~30 s from 200 images, ~21 ms; bank: the memory bank, every good image scored "
                             f"as if unseen (default {DEFAULT_MODE}; docs/anomaly.md compares them)")
    parser.add_argument("--val-good", type=Path, help="folder of good validation images")
    parser.add_argument("--val-bad", type=Path, help="folder of defective validation images")
    parser.add_argument("--val-masks", type=Path, help="defect masks, named like the bad images (or NAME_mask.png)")
    parser.add_argument("--out", type=Path, required=True, help="the model's folder in a store, e.g. "
                                                                "projects/demo/models/surface")
    parser.add_argument("--backbone", type=Path, help="EfficientNet-lite0 model.xml (default: the store's current)")
    parser.add_argument("--size", type=int, default=256, help="the model's input side in pixels (default 256)")
    parser.add_argument("--version", help="version name (default: the next integer)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.val_masks and not args.val_bad:
        parser.error("--val-masks needs --val-bad")
    if args.version is not None and (args.out / args.version).exists():
        # Said before training, not after it (publish checks again, under the model's lock).
        print(f"error: {args.out / args.version} exists; versions are never overwritten: pick another --version",
              file=sys.stderr)
        return 1
    try:
        backbone = args.backbone or default_backbone()
        if not backbone.is_file():
            raise TrainingError(f"backbone {backbone} not found: run `make models`")
        good, good_paths = load_images(args.good)
        if len(good) < 2:
            raise TrainingError(f"{args.good}: {len(good)} image(s); need at least 2 good images")
        val_good = load_images(args.val_good)[0] if args.val_good else None
        val_bad, bad_paths = load_images(args.val_bad) if args.val_bad else (None, [])
        masks = load_anomaly_masks(args.val_masks, bad_paths) if args.val_masks else None
        print(f"training ({args.mode}) on {len(good)} good images from {args.good} at {args.size}x{args.size} "
              f"(backbone {backbone})", flush=True)
        trained = train_by_mode(good, backbone, mode=args.mode, size=args.size, val_good=val_good, val_bad=val_bad,
                                val_bad_masks=masks, seed=args.seed)
        metrics = trained.metrics
        if "bank_size" in metrics:
            print(f"trained in {metrics['train_seconds']:.2f} s ({metrics['augmented_images']} augmented images, "
                  f"bank {metrics['bank_size']})")
        else:
            print(f"trained in {metrics['train_seconds']:.2f} s ({metrics['training_images']} images in "
                  f"{metrics['views']} views, {metrics['calibration_images']} held out for the threshold)")
        print(f"threshold {trained.threshold:.4f} ({metrics['threshold_rule']}); pixel threshold "
              f"{trained.pixel_threshold:.4f}")
        if "image_auroc" in metrics:
            goods = f"{metrics['val_good']} good" if metrics["val_good"] else "training images left out as good"
            print(f"validation: image AUROC {metrics['image_auroc']:.4f} ({goods}, {metrics['val_bad']} bad)")
        if "pixel_auroc" in metrics:
            print(f"validation: pixel AUROC {metrics['pixel_auroc']:.4f}")
        source = {"good": str(args.good), "good_images": [p.name for p in good_paths]}
        version = save_anomaly_model(trained, args.out, version=args.version, source=source)
    except (TrainingError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / version} (current -> {version})")
    return 0


def segment_main(argv: Sequence[str] | None = None) -> int:
    """``appliance train segment ...``; ``argv`` starts after ``train segment``."""
    parser = argparse.ArgumentParser(prog="appliance train segment",
                                     description="On-device surface segmentation (PEKAT's Surface Detector): a "
                                                 "per-pixel classifier from a few annotated images.")
    parser.add_argument("--images", type=Path, required=True, help="annotated images (png/jpg/bmp)")
    parser.add_argument("--masks", type=Path, required=True, help="masks named like the images, .png, value = class")
    parser.add_argument("--labels", required=True, help="class names in id order, comma-separated (1, 2, ...)")
    parser.add_argument("--val-images", type=Path)
    parser.add_argument("--val-masks", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the model's folder in a store")
    parser.add_argument("--backbone", type=Path, help="EfficientNet-lite0 model.xml (default: the store's current)")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        images, paths = load_images(args.images)
        trained = train_segmenter(images, load_class_masks(args.masks, paths), args.labels.split(","),
                                  args.backbone or default_backbone(), size=args.size)
        print(f"trained on {len(images)} images in {trained.metrics['train_seconds']:.2f} s "
              f"(cells per class {trained.metrics['cells_per_class']})")
        if args.val_images and args.val_masks:
            val_images, val_paths = load_images(args.val_images)
            result = evaluate(trained, val_images, load_class_masks(args.val_masks, val_paths))
            trained.metrics["validation"] = result
            print("validation IoU: " + ", ".join(f"{name} {value:.3f}" for name, value in result["iou"].items()))
        version = save_segmenter(trained, args.out)
    except (TrainingError, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / version} (current -> {version})")
    return 0
