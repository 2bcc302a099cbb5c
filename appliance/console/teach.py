"""Teaching an anomaly model from the console: the images, the training in its own process, the scores that
the threshold is chosen from, and saving the result as a new version that the running flow switches to.

One draft at a time lives in `<console folder>/teach/`: `good/` and `bad/` (PNG files), and after training
`trained/model.xml` with `result.json` (threshold, per-image scores, metrics). Training runs as
``python -m appliance.console.teach DRAFT_DIR`` at a lower priority (``os.nice``) and with its address space
bounded (RLIMIT_AS), so the inspection workers keep the cores and a huge set cannot take the line PC's memory;
it reports its stages as JSON lines on stdout.

The operator chooses the trainer (``MODES``: ``fast`` by default, ``thorough``, ``bank``; appliance/training/modes.py).
What the page shows of the scores is what each trainer really did: the threshold is fitted on good scores of images
the model has not learnt from (the bank: every image left out of the bank in turn; the discriminator: a quarter of
the images held out of training, each in its 8 rotations x flips), and those are the images listed as "unseen" with a
verdict that counts. The discriminator's training images are scored too and listed as "trained on", apart on the
histogram and not counted: a model's scores of what it learnt from say little about new parts (on the benchmark's
surfaces, crops of what it trained on scored up to 8x lower than new parts; on the demo's tiles its training images
happened to score higher than the held-out ones).

The training code is reached in two functions only, ``train_draft`` (in the child) and ``save_version`` (in the
server), through ``appliance.training.anomaly``, ``appliance.training.modes`` and ``appliance.training.export``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from appliance.console.background import Background
from appliance.context import Context
from appliance.errors import ApplianceError, BadRequest

if TYPE_CHECKING:
    from appliance.training.anomaly import TrainedAnomaly

log = logging.getLogger("appliance.console")

SETS = ("good", "bad")
MAX_IMAGES = {"good": 200, "bad": 100}
MIN_GOOD = 2
# The child's address space: a 12-image demo training peaks at 1.1 GiB of address space (VmPeak, 0.34 GiB
# resident); 200 images at 256 px stay far below this. Past it the child fails with a MemoryError, not the PC.
MEMORY_LIMIT_BYTES = 3 << 30
TRAINING_NICE = 10
# The trainer teaching uses unless the operator chooses another (appliance/training/modes.py): the discriminator,
# which found more than the memory bank on every benchmark surface and infers faster (docs/anomaly.md).
TEACH_MODE = "fast"
# What the page says of each mode, in the order it offers them (measured on 2 cores, docs/anomaly.md).
MODES = {
    "fast": "learned discriminator: most surfaces; about 4-5 s from 20 images, 8 ms a frame",
    "thorough": "discriminator on the frame enlarged 1.5x: thin scratches, small spots; about 40 s from 200 images, "
                "21 ms a frame",
    "bank": "memory bank: structured parts with few good images; about 3 s from 20 images, 13 ms a frame",
}
# The stages the child reports by trainer, in order, and the share of a 12-image training on the demo's parts each
# took here (for the bar).
STAGES = {
    "bank": (("features", 0.40), ("bank", 0.44), ("threshold", 0.12), ("save", 0.01), ("scores", 0.03)),
    "discriminator": (("features", 0.42), ("discriminator", 0.40), ("threshold", 0.10), ("save", 0.01),
                      ("scores", 0.07)),
}

THUMBNAIL_SIDE = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def stages_of(mode: str) -> tuple[tuple[str, float], ...]:
    """The stages a training of ``mode`` reports, with their shares of the time."""
    return STAGES["bank" if mode == "bank" else "discriminator"]


def safe_name(name: str) -> str:
    """A file name for an uploaded image: its stem with only safe characters, as PNG."""
    stem = _UNSAFE.sub("_", Path(name).stem).strip("._") or "image"
    return f"{stem[:80]}.png"


# ---------------------------------------------------------------------------------------------------------
# The child process


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def train_draft(draft: Path, size: int, backbone: Path | None = None, mode: str = TEACH_MODE) -> dict[str, Any]:
    """Train on ``draft``/good with the trainer ``mode`` names (validated with ``draft``/bad when there are bad
    images); writes trained/ and result.json and returns the result."""
    import openvino as ov

    from appliance.training import anomaly as training
    from appliance.training.modes import train_by_mode

    good, good_paths = training.load_images(draft / "good")
    bad, bad_paths = training.load_images(draft / "bad") if (draft / "bad").is_dir() else ([], [])
    if len(good) < MIN_GOOD:
        raise training.AnomalyTrainingError(f"{len(good)} good image(s); teaching needs at least {MIN_GOOD}")
    backbone = backbone or training.default_backbone()
    started = time.perf_counter()

    def report(stage: str) -> None:  # the bad images' validation belongs to the threshold's stage here
        if stage != "validation":
            _emit({"stage": stage})

    trained = train_by_mode(good, backbone, mode=mode, size=size, val_bad=bad or None, progress=report)
    _emit({"stage": "save"})
    output = draft / "trained"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir()
    # f32 weights, as save_anomaly_model writes them: fp16 would move every distance.
    ov.save_model(trained.model, output / "model.xml", compress_to_fp16=False)
    _emit({"stage": "scores"})
    scores = good_image_scores(trained, good, mode)
    bad_scores = trained.validation_scores.get("bad", [])
    result = {
        "mode": mode, "threshold": trained.threshold, "pixel_threshold": trained.pixel_threshold,
        "size": trained.size, "images": trained.images, "backbone": trained.backbone,
        "metrics": _plain(trained.metrics), "seconds": round(time.perf_counter() - started, 2),
        "fitted_on": scores["fitted_on"],
        "scores": {"good": [{"name": path.name, "score": score, "unseen": unseen}
                            for path, (score, unseen) in zip(good_paths, scores["good"], strict=True)],
                   "bad": [{"name": p.name, "score": s} for p, s in zip(bad_paths, bad_scores, strict=True)],
                   "fitted": scores["fitted"]},
    }
    (draft / "result.json").write_text(json.dumps(result, indent=1))
    return result


def good_image_scores(trained: TrainedAnomaly, good: list[np.ndarray], mode: str) -> dict[str, Any]:
    """Every good image's score and whether the model learnt from it, the scores the calibrated threshold was
    fitted on (the trainer's own, `calibration_scores`), and a sentence saying which those are.

    The bank's leave-one-out scores (at most LEAVE_OUT_IMAGES images) are each image scored without its own
    entries: unseen. The discriminator's held-out images are unseen, and its threshold is fitted on them in their
    8 rotations x flips; with fewer than 6 images it held none out and fitted on its training images. The other
    images are scored here by the trained graph as they are, and are "trained on".
    """
    from appliance.training import anomaly as training

    request = training.compile_anomaly_model(trained.model).create_infer_request()
    known: dict[int, float] = trained.leave_out_scores
    held_out = mode == "bank" or trained.metrics.get("calibration_images", 0) > 0
    scores = [(known[index], held_out) if index in known else (training.predict(request, image)[0], False)
              for index, image in enumerate(good)]
    fitted = trained.calibration_scores
    if mode == "bank":
        sentence = (f"{len(fitted)} good images, each scored by the bank without its own patches (leave-one-out)"
                    + (f"; the other {len(good) - len(fitted)} are in the bank" if len(fitted) < len(good) else ""))
    else:
        sentence = (f"{len(known)} good images held out of training, each in its 8 rotations x flips "
                    f"({len(fitted)} scores); the other {len(good) - len(known)} trained the model" if held_out else
                    f"the {len(known)} training images in their 8 rotations x flips ({len(fitted)} scores): too few "
                    f"images to hold any out (6 are needed), so the threshold may fail good parts the model has not "
                    f"seen; teach with more")
    return {"good": scores, "fitted": fitted, "fitted_on": sentence}


def _plain(value: Any) -> Any:
    """Metrics as JSON types (numpy scalars as numbers)."""
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


def save_version(draft: Path, result: dict[str, Any], model_dir: Path, threshold: float, who: str) -> str:
    """Write the draft's trained model as the next version of ``model_dir`` with ``threshold``, leaving `current`
    as it is (the hot swap moves it once the version has compiled); returns the version. In a thread of the
    server: it reads and writes files."""
    from appliance.runtime.devices import core
    from appliance.training import anomaly as training
    from appliance.training.export import save_anomaly_model

    metrics = dict(result["metrics"])
    if abs(threshold - float(result["threshold"])) > 1e-9:
        metrics["threshold_rule"] = f"chosen in the console by session {who}"
        metrics["calibrated_threshold"] = float(result["threshold"])
    pixel_threshold = training.moved_pixel_threshold(float(result["pixel_threshold"]), float(result["threshold"]),
                                                     threshold)
    model = core().read_model(str(draft / "trained" / "model.xml"))
    trained = training.TrainedAnomaly(model, threshold, pixel_threshold, metrics, int(result["size"]),
                                      int(result["images"]), str(result["backbone"]))
    source = {"console": who, "good_images": [entry["name"] for entry in result["scores"]["good"]],
              "bad_images": [entry["name"] for entry in result["scores"]["bad"]]}
    return save_anomaly_model(trained, model_dir, source=source, make_current=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the console's teaching draft (started by the console).")
    parser.add_argument("draft", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbone", type=Path)
    parser.add_argument("--mode", default=TEACH_MODE, choices=list(MODES))
    args = parser.parse_args(argv)
    os.nice(TRAINING_NICE)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    try:
        result = train_draft(args.draft, args.size, args.backbone, args.mode)
    except MemoryError:
        _emit({"error": f"training ran out of its {MEMORY_LIMIT_BYTES >> 30} GiB; teach with fewer images"})
        return 1
    except ValueError as error:  # AnomalyTrainingError: what was wrong with the images
        _emit({"error": str(error)})
        return 1
    _emit({"done": True, "seconds": result["seconds"]})
    return 0


# ---------------------------------------------------------------------------------------------------------
# The server's side


class Teaching:
    """The draft, its images, the training process and its result."""

    def __init__(self, folder: Path, background: Background):
        self.folder = folder
        self.background = background
        self.status = "idle"  # idle, training, trained, failed, saved
        self.error: str | None = None
        self.model: str | None = None
        self.mode = TEACH_MODE
        self.stage: str | None = None
        self.stage_seconds: list[list[Any]] = []  # [stage, seconds] of the stages done
        self._stage_started = 0.0
        self._started = 0.0
        self.result: dict[str, Any] | None = None
        self.saved: dict[str, Any] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._follower: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks
        self._collect_lock = threading.Lock()
        self.collecting: dict[str, Any] | None = None  # {"set", "wanted", "taken", "written"}
        self._load_result()

    def _load_result(self) -> None:
        try:
            self.result = json.loads((self.folder / "result.json").read_text())
            if (self.folder / "trained" / "model.xml").is_file():
                self.status = "trained"
                self.model = self.result.get("model") if isinstance(self.result, dict) else None
                self.mode = str(self.result.get("mode", "bank")) if isinstance(self.result, dict) else TEACH_MODE
            else:
                self.result = None
        except (OSError, ValueError):
            self.result = None

    def _changed(self) -> None:
        """The images changed: a result trained on the old set no longer describes the draft."""
        if self.status == "training":
            return
        self.result, self.saved, self.error, self.status = None, None, None, "idle"
        (self.folder / "result.json").unlink(missing_ok=True)
        shutil.rmtree(self.folder / "trained", ignore_errors=True)

    def images(self, kind: str) -> list[str]:
        folder = self.folder / kind
        return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []

    def image_path(self, kind: str, name: str) -> Path:
        if kind not in SETS or name != safe_name(name) or name not in self.images(kind):
            raise BadRequest(f"no {kind} image '{name[:100]}' in the draft")
        return self.folder / kind / name

    def _check_room(self, kind: str, adding: int = 1) -> None:
        if kind not in SETS:
            raise BadRequest(f"set must be one of {', '.join(SETS)}, got '{kind[:20]}'")
        if self.status == "training":
            raise ApplianceError("training is running; wait for it (or cancel it) before changing the images",
                                 status=409)
        if len(self.images(kind)) + adding > MAX_IMAGES[kind]:
            raise BadRequest(f"the draft holds at most {MAX_IMAGES[kind]} {kind} images")

    def add(self, kind: str, name: str, image: np.ndarray) -> str:
        """Store a decoded image (u8 gray or BGR) under a free name; in a thread."""
        self._check_room(kind)
        folder = self.folder / kind
        folder.mkdir(parents=True, exist_ok=True)
        stored = safe_name(name)
        number = 2
        while (folder / stored).exists():
            stored = f"{Path(safe_name(name)).stem}-{number}.png"
            number += 1
        if not cv2.imwrite(str(folder / stored), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
            raise ApplianceError(f"cannot write {folder / stored}")
        self._changed()
        return stored

    def remove(self, kind: str, name: str | None) -> int:
        """One image, or the whole set when ``name`` is None; returns how many went."""
        self._check_room(kind, adding=0)
        names = [name] if name is not None else self.images(kind)
        for each in names:
            self.image_path(kind, each).unlink(missing_ok=True)
        if names:
            self._changed()
        return len(names)

    def thumbnail(self, kind: str, name: str) -> bytes:
        image = cv2.imread(str(self.image_path(kind, name)), cv2.IMREAD_COLOR)
        if image is None:
            raise BadRequest(f"{name}: unreadable")
        scale = THUMBNAIL_SIDE / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()

    # -- collecting the next frames of the line ------------------------------------------------------------------

    def collect(self, kind: str, count: int) -> None:
        self._check_room(kind, count)
        with self._collect_lock:
            self.collecting = {"set": kind, "wanted": count, "taken": 0, "written": 0}

    def stop_collecting(self) -> None:
        with self._collect_lock:
            self.collecting = None

    def observe(self, image: np.ndarray, ctx: Context, capability: str | None) -> None:
        """In the worker thread: take the frame while a collection wants more (the write is the console's)."""
        if self.collecting is None or capability is not None:
            return
        with self._collect_lock:
            wanted = self.collecting
            if wanted is None or wanted["taken"] >= wanted["wanted"]:
                return
            wanted["taken"] += 1
            number = wanted["taken"]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if not self.background.offer(lambda: self._write_collected(wanted, image, f"line-{stamp}-{number:03d}")):
            with self._collect_lock:
                wanted["taken"] -= 1  # the next frame takes its place

    def _write_collected(self, wanted: dict[str, Any], image: np.ndarray, name: str) -> None:
        self.add(wanted["set"], name, image)
        with self._collect_lock:
            wanted["written"] += 1
            if wanted["written"] >= wanted["wanted"] and self.collecting is wanted:
                self.collecting = None
        log.info("teach: collected %s (%d of %d)", name, wanted["written"], wanted["wanted"])

    # -- training ------------------------------------------------------------------------------------------------

    async def train(self, model: str, size: int, mode: str = TEACH_MODE) -> None:
        if self.status == "training":
            raise ApplianceError("training is already running", status=409)
        good = len(self.images("good"))
        if good < MIN_GOOD:
            raise BadRequest(f"{good} good image(s) in the draft; teaching needs at least {MIN_GOOD}")
        self._changed()
        self.status, self.model, self.error, self.stage, self.stage_seconds = "training", model, None, None, []
        self.mode = mode
        self._started = self._stage_started = time.monotonic()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "appliance.console.teach", str(self.folder), "--size", str(size), "--mode", mode,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self._follower = asyncio.get_running_loop().create_task(self._follow(self._process))

    def _enter_stage(self, stage: str | None) -> None:
        now = time.monotonic()
        if self.stage is not None:
            self.stage_seconds.append([self.stage, round(now - self._stage_started, 2)])
        self.stage, self._stage_started = stage, now

    async def _follow(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None and process.stderr is not None
        error = None
        errors_read = asyncio.ensure_future(process.stderr.read())
        while True:
            line = await process.stdout.readline()
            if not line:
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "stage" in message:
                self._enter_stage(str(message["stage"]))
            elif "error" in message:
                error = str(message["error"])
        code = await process.wait()
        stderr = (await errors_read).decode("utf-8", "replace")
        self._process = None
        self._enter_stage(None)
        if code == 0:
            model = self.model
            self._load_result()
            if self.result is not None:
                # The model it was trained for, so that a draft trained before a restart can still be saved.
                self.model = self.result["model"] = model
                (self.folder / "result.json").write_text(json.dumps(self.result, indent=1))
                log.info("teach: %s trained in %.1f s", self.model, time.monotonic() - self._started)
                return
            error = "training finished without a result"
        if error is None:
            last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [f"exit code {code}"]
            error = "training stopped" if code < 0 else f"training failed: {last[0][:300]}"
        self.status, self.error = "failed", error
        log.warning("teach: %s", error)

    def cancel(self) -> bool:
        if self._process is None:
            return False
        self._process.kill()
        return True

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "status": self.status, "error": self.error, "model": self.model,
            "stage": self.stage, "stage_elapsed": round(now - self._stage_started, 2) if self.stage else None,
            "stages_done": self.stage_seconds, "stages": [name for name, _ in stages_of(self.mode)],
            "stage_shares": dict(stages_of(self.mode)), "mode": self.mode,
            "modes": [{"mode": mode, "note": note} for mode, note in MODES.items()],
            "elapsed": round(now - self._started, 2) if self.status == "training" else None,
            "images": {kind: self.images(kind) for kind in SETS}, "max_images": MAX_IMAGES,
            "collecting": dict(self.collecting) if self.collecting else None,
            "result": self.result, "saved": self.saved,
        }


if __name__ == "__main__":
    sys.exit(main())
