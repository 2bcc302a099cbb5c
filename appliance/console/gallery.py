"""The NG gallery: frames kept on disk with their context, to look at and to retrain from elsewhere.

Kept: every NG frame, every frame a Code hook marked with `context["save"] = True` (PEKAT's key), and one OK frame
per `ok_every_s`. Each is three files in `<console folder>/gallery/`: the input frame as the camera sent it
(`<id>.png`, or `.jpg`), a preview with the verdict drawn (`<id>.preview.jpg`) and `<id>.json` (when, verdict,
the deciding nodes, and the context as PEKAT answers it). Ids sort by time. Past `max_frames` or `max_megabytes`
the oldest go first. Writing happens in the console's background thread, `max_per_second` frames at most; past that, or when
the thread falls behind, frames are dropped and counted rather than held (a line at 100 NG frames/s must fill
neither the memory nor the cores).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from appliance.config.project import ConsoleGallery
from appliance.console import views
from appliance.console.background import Background
from appliance.context import Context, to_json

log = logging.getLogger("appliance.console")

ENTRY_ID = re.compile(r"^[0-9]{13}-[0-9]{5}$")
# PNG level 1: a 1080p frame in ~25 ms instead of ~70 ms at OpenCV's default, for ~15 % more bytes.
_PNG = [cv2.IMWRITE_PNG_COMPRESSION, 1]
_JPEG = [cv2.IMWRITE_JPEG_QUALITY, 95]
PREVIEW_SIDE = 480


@dataclass
class Entry:
    id: str
    time: float
    verdict: bool
    reason: str  # ng, save (a hook asked), sample (an OK frame kept by sampling)
    nodes: list[str]
    decided_by: list[dict[str, str]]
    data: str
    frame: str  # file name of the input frame
    width: int
    height: int
    bytes: int = 0
    files: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        found = asdict(self)
        found.pop("files")
        return found


class Gallery:
    def __init__(self, folder: Path, settings: ConsoleGallery, background: Background):
        self.folder = folder
        self.settings = settings
        self.background = background
        self._entries: dict[str, Entry] = {}  # by id, oldest first
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._last_ok = 0.0
        self._second, self._in_second = 0, 0
        self.bytes = 0
        self.dropped = 0

    # -- the worker's side -------------------------------------------------------------------------------------

    def observe(self, image: np.ndarray, ctx: Context, capability: str | None) -> None:
        """In the worker thread: decide whether the frame is kept, and hand it to the background thread."""
        if capability is not None or not self.settings.enabled:
            return
        if not ctx.get("result"):
            reason = "ng"
        elif ctx.get("save") is True:
            reason = "save"
        else:
            now = time.monotonic()
            if not self.settings.ok_every_s or now - self._last_ok < self.settings.ok_every_s:
                return
            self._last_ok = now
            reason = "sample"
        at = time.time()
        # At most max_per_second frames written a second: a line that turns NG at 100 frames/s costs the disk
        # thread a bounded share of a core (a 1080p PNG is ~25 ms of CPU), and the frames past it are counted.
        second = int(at)
        if second != self._second:
            self._second, self._in_second = second, 0
        if self._in_second >= self.settings.max_per_second:
            self.dropped += 1
            return
        self._in_second += 1
        number = next(self._numbers) % 100_000
        if not self.background.offer(lambda: self._write(image, ctx, at, number, reason)):
            self.dropped += 1

    # -- the background thread's side --------------------------------------------------------------------------

    def load(self) -> None:
        """Index what an earlier run kept (in the background thread, at start)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found = []
        for path in sorted(self.folder.glob("*.json")):
            if not ENTRY_ID.match(path.stem):
                continue
            try:
                meta = json.loads(path.read_text())
                entry = Entry(**{key: meta[key] for key in Entry.__dataclass_fields__ if key in meta})
            except (OSError, ValueError, TypeError, KeyError):
                log.warning("gallery: %s is unreadable; skipped", path.name)
                continue
            found.append(entry)
        with self._lock:
            for entry in found:
                self._entries[entry.id] = entry
            self._entries = dict(sorted(self._entries.items()))
            self.bytes = sum(entry.bytes for entry in self._entries.values())
        self._trim()

    def _write(self, image: np.ndarray, ctx: Context, at: float, number: int, reason: str) -> None:
        entry_id = f"{int(at * 1000):013d}-{number:05d}"
        suffix, options = (".png", _PNG) if self.settings.format == "png" else (".jpg", _JPEG)
        ok, frame_bytes = cv2.imencode(suffix, image, options)
        ok_preview, preview = cv2.imencode(".jpg", views.preview(ctx, heat=True, side=PREVIEW_SIDE),
                                           [cv2.IMWRITE_JPEG_QUALITY, views.PREVIEW_QUALITY])
        if not ok or not ok_preview:
            log.warning("gallery: frame %s could not be encoded", entry_id)
            return
        height, width = image.shape[:2]
        entry = Entry(entry_id, at, bool(ctx.get("result")), reason, views.nodes_involved(ctx), views.decided_by(ctx),
                      str(ctx.get("data") or "")[:200], entry_id + suffix, width, height,
                      files=[entry_id + suffix, entry_id + ".preview.jpg", entry_id + ".json"])
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / entry.frame).write_bytes(frame_bytes.tobytes())
        (self.folder / f"{entry_id}.preview.jpg").write_bytes(preview.tobytes())
        meta = {**asdict(entry), "context": json.loads(to_json(ctx))}
        body = json.dumps(meta, indent=1).encode()
        entry.bytes = len(frame_bytes) + len(preview) + len(body) + 64
        meta["bytes"] = entry.bytes
        # The JSON last, and in one rename: an entry is listed (at start) only once its frame is on disk.
        temporary = self.folder / f".{entry_id}.json.tmp"
        temporary.write_bytes(json.dumps(meta, indent=1).encode())
        temporary.replace(self.folder / f"{entry_id}.json")
        with self._lock:
            self._entries[entry_id] = entry
            self.bytes += entry.bytes
        self._trim()

    def _trim(self) -> None:
        limit_bytes = self.settings.max_megabytes * (1 << 20)
        while True:
            with self._lock:
                if not self._entries or (len(self._entries) <= self.settings.max_frames and self.bytes <= limit_bytes):
                    return
                oldest = self._entries.pop(next(iter(self._entries)))
                self.bytes -= oldest.bytes
            for name in oldest.files or [oldest.frame, f"{oldest.id}.preview.jpg", f"{oldest.id}.json"]:
                (self.folder / name).unlink(missing_ok=True)

    # -- the event loop's side ---------------------------------------------------------------------------------

    def listing(self, *, node: str | None = None, verdict: str | None = None, since: float | None = None,
                until: float | None = None, limit: int = 60, before: str | None = None) -> dict[str, Any]:
        """Entries newest first that match every filter given, and what the filters can choose from."""
        with self._lock:
            entries = list(self._entries.values())
            total_bytes = self.bytes
        nodes = sorted({name for entry in entries for name in entry.nodes})
        matching = []
        for entry in reversed(entries):
            if before is not None and entry.id >= before:
                continue
            if node and node not in entry.nodes:
                continue
            if verdict in ("ok", "ng") and entry.verdict != (verdict == "ok"):
                continue
            if since is not None and entry.time < since:
                continue
            if until is not None and entry.time > until:
                continue
            matching.append(entry)
        return {"entries": [entry.public() for entry in matching[:limit]], "matching": len(matching),
                "more": len(matching) > limit, "total": len(entries), "bytes": total_bytes, "nodes": nodes,
                "dropped": self.dropped, "max_per_second": self.settings.max_per_second,
                "max_frames": self.settings.max_frames,
                "max_megabytes": self.settings.max_megabytes}

    def entry(self, entry_id: str) -> Entry | None:
        if not ENTRY_ID.match(entry_id):
            return None
        with self._lock:
            return self._entries.get(entry_id)

    def write_zip(self, ids: list[str], out: IO[bytes]) -> int:
        """The chosen frames and their JSON, in ng/ and ok/ folders (in a thread: it reads the disk). Returns how
        many frames went in; ids that are gone (trimmed meanwhile) are skipped."""
        written = 0
        # Stored, not deflated: PNG and JPEG do not shrink further, and the archive is made while the user waits.
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for entry_id in ids:
                entry = self.entry(entry_id)
                if entry is None:
                    continue
                folder = "ok" if entry.verdict else "ng"
                try:
                    archive.write(self.folder / entry.frame, f"{folder}/{entry.frame}")
                    archive.write(self.folder / f"{entry.id}.json", f"{folder}/{entry.id}.json")
                except FileNotFoundError:
                    continue
                written += 1
        return written
