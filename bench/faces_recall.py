"""Face recall and false positives of BlazeFace short and full range, through the detect@1 node as it runs.

Two sets, both from scikit-image (nothing downloaded):

- **photos**: the faces of `astronaut` and `camera`, boxes labelled by hand below (forehead to chin, cheek to
  cheek), and pictures without a human face, where every box is a false positive;
- **rendered crowds**: seeded scenes of 640x480 where face crops are pasted at one size per scene, at random
  places that do not overlap, on textures and photos without faces; the pasted boxes are the truth. The
  crops are the 100 faces of `lfw_subset` (25x25 grey, cut tight around the face) and the two photo faces
  with their hair and shoulders (40 % context around the labelled box).

A face is found when a box overlaps it at IoU >= 0.5 (each box finds one face at most); `centre` counts a
face as found when a box's centre falls inside it. A box that finds no face is a false positive.

    .venv/bin/python bench/faces_recall.py [--scenes-per-size 6] [--seed 7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import yaml
from skimage import data

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.frames import Frame  # noqa: E402
from appliance.project import Project  # noqa: E402

Box = tuple[float, float, float, float]  # x0, y0, x1, y1
MODELS = ("face_short", "face_full")
# detect@1 nodes run on each frame: both models, letterboxed (the BlazeFace default) and stretched.
DETECTORS = {f"{model}_{fit}": {"model": model, "fit": fit} for model in MODELS for fit in ("letterbox", "stretch")}
# Labelled by eye on 3x enlargements: forehead (hairline) to chin, cheek (or ear) to cheek (or nose tip).
PHOTO_FACES: dict[str, list[Box]] = {"astronaut": [(182, 80, 272, 170)], "camera": [(183, 125, 258, 200)]}
NO_FACES = ("coffee", "chelsea", "rocket", "hubble_deep_field", "stereo_motorcycle", "immunohistochemistry",
            "retina", "horse", "coins", "moon", "page", "text", "brick", "grass", "gravel", "logo", "clock", "cell",
            "colorwheel")
BACKGROUNDS = ("brick", "grass", "gravel", "coffee", "hubble_deep_field", "rocket")
SIZES = (24, 32, 48, 64, 96, 128, 192, 256)
SCENE_W, SCENE_H = 640, 480


def picture(name: str) -> np.ndarray:
    """A scikit-image picture as 3-channel BGR u8."""
    image = getattr(data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: left, right, disparity
        image = image[0]
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2BGR)
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


@dataclass
class FaceCrop:
    """A face picture and where the face is in it."""

    image: np.ndarray
    face: Box


def face_crops() -> list[FaceCrop]:
    crops = []
    for face in data.lfw_subset()[:100]:  # the first 100 are faces, the rest are not
        grey = (face * 255).astype(np.uint8)
        crops.append(FaceCrop(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), (0, 0, 25, 25)))
    for name, boxes in PHOTO_FACES.items():
        image = picture(name)
        for x0, y0, x1, y1 in boxes:
            grow_x, grow_y = 0.4 * (x1 - x0), 0.4 * (y1 - y0)
            left, top = max(0, int(x0 - grow_x)), max(0, int(y0 - grow_y))
            right, bottom = min(image.shape[1], int(x1 + grow_x)), min(image.shape[0], int(y1 + grow_y))
            crops.append(FaceCrop(image[top:bottom, left:right].copy(), (x0 - left, y0 - top, x1 - left, y1 - top)))
    return crops


@dataclass
class Scene:
    image: np.ndarray
    faces: list[Box]
    size: int
    source: str  # lfw or photo


def render_scene(rng: np.random.Generator, crops: list[FaceCrop], size: int, background: str, source: str) -> Scene:
    """Faces of ``size`` pixels (the face box's width) pasted on a background, not overlapping one another."""
    canvas = cv2.resize(picture(background), (SCENE_W, SCENE_H), interpolation=cv2.INTER_AREA)
    faces: list[Box] = []
    taken: list[Box] = []
    for _ in range(60):
        if len(faces) == 6:
            break
        crop = crops[rng.integers(len(crops))]
        fx0, fy0, fx1, fy1 = crop.face
        scale = size / (fx1 - fx0)
        height, width = crop.image.shape[:2]
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        if new_w >= SCENE_W or new_h >= SCENE_H:
            continue
        x, y = int(rng.integers(0, SCENE_W - new_w)), int(rng.integers(0, SCENE_H - new_h))
        if any(x < b[2] + 8 and x + new_w + 8 > b[0] and y < b[3] + 8 and y + new_h + 8 > b[1] for b in taken):
            continue
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        canvas[y:y + new_h, x:x + new_w] = cv2.resize(crop.image, (new_w, new_h), interpolation=interpolation)
        taken.append((x, y, x + new_w, y + new_h))
        faces.append((x + fx0 * scale, y + fy0 * scale, x + fx1 * scale, y + fy1 * scale))
    return Scene(canvas, faces, size, source)


def iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre_inside(box: Box, face: Box) -> bool:
    return face[0] <= (box[0] + box[2]) / 2 <= face[2] and face[1] <= (box[1] + box[3]) / 2 <= face[3]


@dataclass
class Tally:
    faces: int = 0
    hits: int = 0
    centre_hits: int = 0
    false_positives: int = 0
    images: int = 0
    best_false: list[float] = field(default_factory=list)

    def add(self, truth: list[Box], found: list[tuple[Box, float]]) -> None:
        self.images += 1
        self.faces += len(truth)
        unused = list(range(len(found)))
        for face in truth:
            best_overlap, best = max(((iou(face, found[i][0]), i) for i in unused), default=(0.0, -1))
            if best_overlap >= 0.5:
                self.hits += 1
                unused.remove(best)
            if any(centre_inside(box, face) for box, _ in found):
                self.centre_hits += 1
        # A box on a face that another box already found is a duplicate, not a false positive.
        false = [i for i in unused if not any(iou(face, found[i][0]) >= 0.5 or centre_inside(found[i][0], face)
                                              for face in truth)]
        self.false_positives += len(false)
        self.best_false.extend(found[i][1] for i in false)

    def recall(self, centre: bool = False) -> str:
        if not self.faces:
            return "-"
        return f"{(self.centre_hits if centre else self.hits) / self.faces:.2f}"


def detector_project(folder: Path) -> Project:
    """The detect@1 nodes of DETECTORS on the same frame, as a flow with several first nodes."""
    nodes = {name: {"type": "detect@1", **settings} for name, settings in DETECTORS.items()}
    (folder / "flow.yaml").write_text(yaml.safe_dump({"nodes": nodes}))
    (folder / "project.yaml").write_text(yaml.safe_dump({
        "name": "faces-recall", "flow": "flow.yaml", "models_dir": str(REPO / "models"),
        "cache_dir": str(folder / "cache")}))
    project = Project.load(folder)
    project.prepare()
    return project


def detect(project: Project, image: np.ndarray) -> dict[str, list[tuple[Box, float]]]:
    ctx = project.inspect(Frame(image, "bench"), "")
    found: dict[str, list[tuple[Box, float]]] = {name: [] for name in DETECTORS}
    for r in ctx["detectedRectangles"]:
        found[r["source"]["moduleId"]].append(((r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]),
                                               r["confidence"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes-per-size", type=int, default=6, help="scenes per face size and crop source")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    names = list(DETECTORS)
    with tempfile.TemporaryDirectory() as tmp:
        project = detector_project(Path(tmp))
        try:
            photo_rows = []
            photo_false = {name: Tally() for name in names}
            for picture_name in (*PHOTO_FACES, *NO_FACES):
                truth = PHOTO_FACES.get(picture_name, [])
                found = detect(project, picture(picture_name))
                cells = []
                for name in names:
                    tally = Tally()
                    tally.add(truth, found[name])
                    photo_false[name].false_positives += tally.false_positives
                    scores = ", ".join(f"{score:.2f}" for _, score in found[name]) or "-"
                    cells.append(f"{tally.hits}/{len(truth)} found, {tally.false_positives} false ({scores})"
                                 if truth else f"{tally.false_positives} false ({scores})")
                photo_rows.append(f"| {picture_name} | {len(truth)} | " + " | ".join(cells) + " |")
            crops = face_crops()
            pools = {"lfw": crops[:100], "photo": crops[100:]}
            tallies: dict[tuple[str, str, int], Tally] = {}
            totals = {(name, source): Tally() for name in names for source in pools}
            for source, pool in pools.items():
                for size in SIZES:
                    for index in range(args.scenes_per_size):
                        scene = render_scene(rng, pool, size, BACKGROUNDS[index % len(BACKGROUNDS)], source)
                        found = detect(project, scene.image)
                        for name in names:
                            tallies.setdefault((name, source, size), Tally()).add(scene.faces, found[name])
                            totals[(name, source)].add(scene.faces, found[name])
            empty = {name: Tally() for name in names}
            for background in BACKGROUNDS:
                image = cv2.resize(picture(background), (SCENE_W, SCENE_H), interpolation=cv2.INTER_AREA)
                found = detect(project, image)
                for name in names:
                    empty[name].add([], found[name])
        finally:
            project.close()
    header = "| " + " | ".join(name.replace("face_", "").replace("_", ", ") for name in names) + " |"
    print("\n### Photos (scikit-image): faces found at IoU >= 0.5, false boxes (scores)\n")
    print("| picture | faces " + header)
    print("|---|---" + "|---" * len(names) + "|")
    print("\n".join(photo_rows))
    print(f"\nFalse boxes on the {len(NO_FACES)} pictures without a human face: " + ", ".join(
        f"{name} {photo_false[name].false_positives}" for name in names))
    for source, title in (("lfw", "LFW faces (tight 25x25 grey crops)"),
                          ("photo", "astronaut and camera faces with hair and shoulders")):
        print(f"\n### Rendered crowds, {title}: recall at IoU >= 0.5 / with the box centre inside\n")
        print("| face width px | faces " + header)
        print("|---|---" + "|---" * len(names) + "|")
        for size in SIZES:
            row = [tallies[(name, source, size)] for name in names]
            print(f"| {size} | {row[0].faces} | " + " | ".join(
                f"{tally.recall()} / {tally.recall(True)}" if tally.faces else "-" for tally in row) + " |")
        row = [totals[(name, source)] for name in names]
        print(f"| all | {row[0].faces} | " + " | ".join(
            f"{tally.hits}/{tally.faces} = {tally.recall()} / {tally.recall(True)}" for tally in row) + " |")
        print("| false boxes | | " + " | ".join(str(tally.false_positives) for tally in row) + " |")
    print(f"\nBackgrounds alone ({len(BACKGROUNDS)} scenes of {SCENE_W}x{SCENE_H}), false boxes: " + ", ".join(
        f"{name} {empty[name].false_positives}" for name in names))
    print(f"Seed {args.seed}, {args.scenes_per_size} scenes per face size and source, up to 6 faces per scene; "
          "the models' thresholds (short 0.5, full 0.6), weighted NMS at IoU 0.3.")


if __name__ == "__main__":
    main()
