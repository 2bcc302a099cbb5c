"""identify@1's false accepts and false rejects on folders of real faces, one sub-folder per person.

Each image goes through what enrolment and identify@1 do: BlazeFace full range (the largest face), the chip
aligned from its keypoints, the rebuilt dlib descriptor. Then every pair of images is compared: a pair of the
same person further apart than the threshold is a false reject, a pair of two people closer is a false accept.
Images are padded with a grey border of half their size first (dlib's `johns` are 150x150 chips, a face
filling the frame, which BlazeFace misses otherwise).

    .venv/bin/python bench/identity_quality.py DIR [DIR ...] [--threshold 0.6]

DIR: a folder of person folders (e.g. dlib's examples/johns: 5 people x 11 photos), or a folder of images whose
names before the first digit or '_' name the person (face_recognition 1.3.0's tests/test_images: obama*, biden).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.faces_gallery import GalleryError, _Enroller, enrolment_setup  # noqa: E402
from tests.conftest import write_project  # noqa: E402


def people(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    images = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    for image in images:
        person = image.parent.name if image.parent != folder else re.split(r"[\d_]", image.stem)[0]
        found.setdefault(f"{folder.name}/{person}", []).append(image)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--exclude", nargs="*", default=["32bit.png"],
                        help="file names to leave out (face_recognition's 32bit.png is an unnamed copy of obama)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        project = write_project(Path(tmp) / "p", {"nodes": {"f": {"type": "faces@1", "model": "face_full",
                                                                  "mode": "none"}}},
                                models_dir=str(REPO / "models"), cache_dir=str(Path(tmp) / "cache"))
        enroller = _Enroller(enrolment_setup(project))
        names: list[str] = []
        descriptors = []
        missed = []
        started = time.perf_counter()
        for folder in args.folders:
            for person, paths in people(folder).items():
                for path in paths:
                    if path.name in args.exclude:
                        continue
                    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
                    border = max(image.shape[:2]) // 2
                    image = cv2.copyMakeBorder(image, border, border, border, border, cv2.BORDER_CONSTANT,
                                               value=(128, 128, 128))
                    try:
                        descriptors.append(enroller.descriptor_of_largest_face(image, str(path)))
                        names.append(person)
                    except GalleryError:
                        missed.append(str(path))
        seconds = time.perf_counter() - started
    matrix = np.stack(descriptors)
    genuine, impostor = [], []
    for i, j in combinations(range(len(names)), 2):
        (genuine if names[i] == names[j] else impostor).append(float(np.linalg.norm(matrix[i] - matrix[j])))
    genuine_a, impostor_a = np.array(genuine), np.array(impostor)
    print(f"{len(names)} faces of {len(set(names))} people ({len(missed)} images without a face: {missed}); "
          f"{seconds / max(1, len(names) + len(missed)) * 1000:.0f} ms per image (detection + chip + descriptor)")
    print(f"{len(genuine_a)} same-person pairs: distance median {np.median(genuine_a):.3f}, "
          f"max {genuine_a.max():.3f}")
    print(f"{len(impostor_a)} different-person pairs: distance median {np.median(impostor_a):.3f}, "
          f"min {impostor_a.min():.3f}")
    for threshold in sorted({0.5, 0.55, args.threshold, 0.65}):
        far = (impostor_a < threshold).mean()
        frr = (genuine_a >= threshold).mean()
        print(f"threshold {threshold:.2f}: FAR {far:.4f} ({int((impostor_a < threshold).sum())}/{len(impostor_a)}), "
              f"FRR {frr:.4f} ({int((genuine_a >= threshold).sum())}/{len(genuine_a)})")


if __name__ == "__main__":
    main()
