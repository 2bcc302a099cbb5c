"""folder: a watched folder; each new image file is inspected once, then optionally moved to ok/ or ng/. Files wait
on the disk while the pipeline is busy: none is dropped."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from appliance.sources.base import Acquired, Source, SourceSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class FolderSettings(SourceSettings):
    type: Literal["folder"]
    path: str = Field(min_length=1, description="the folder, relative to the project folder or absolute")
    poll_s: float = Field(0.2, gt=0, le=60, description="how often the folder is looked at")
    # A file still being written looks complete only when its size stopped changing for this long.
    settle_s: float = Field(0.2, ge=0, le=60)
    move_to: str | None = Field(None, description="after inspection, move each file to <move_to>/ok or "
                                "<move_to>/ng (relative to the folder); default: leave it where it is")


class FolderSource(Source[FolderSettings]):
    settings_model = FolderSettings

    @property
    def folder(self) -> Path:
        path = Path(self.settings.path)
        return path if path.is_absolute() else self.project_dir / path

    def open(self) -> None:
        if not self.folder.is_dir():
            raise FileNotFoundError(f"folder {self.folder} not found")
        self._seen: set[str] = set()

    def frames(self) -> Iterator[Acquired]:
        # Imported here: loading a project's configuration reads these settings and must not import OpenCV.
        import cv2

        sizes: dict[str, tuple[int, float]] = {}
        while not self.stopping:
            if not self.folder.is_dir():
                raise FileNotFoundError(f"folder {self.folder} is gone")
            for entry in sorted(os.scandir(self.folder), key=lambda e: e.name):
                if not entry.is_file() or not entry.name.lower().endswith(IMAGE_SUFFIXES) or entry.name in self._seen:
                    continue
                size = entry.stat().st_size
                now = time.monotonic()  # per file: waiting for room may have taken a while
                first = sizes.get(entry.name)
                if first is None or first[0] != size:
                    sizes[entry.name] = (size, now)
                    continue
                if now - first[1] < self.settings.settle_s:
                    continue
                # The file waits on the disk until the pipeline has room: a batch of files copied in at once is
                # inspected file by file, none dropped.
                while not self.wait_for_room(self.settings.poll_s):
                    if self.stopping:
                        return
                self._seen.add(entry.name)
                sizes.pop(entry.name, None)
                image = cv2.imread(entry.path, cv2.IMREAD_COLOR)
                if image is None:
                    self.failed += 1
                    continue
                yield Acquired(image, entry.name, entry.stat().st_mtime, entry.path)
            self._stop.wait(self.settings.poll_s)

    def done(self, frame: Acquired, result: bool | None) -> None:
        if self.settings.move_to is None or frame.path is None or result is None:
            return
        target = self.folder / self.settings.move_to / ("ok" if result else "ng")
        target.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(frame.path, target / Path(frame.path).name)
        except OSError as error:
            self.last_error = f"moving {frame.path}: {error.strerror}"
