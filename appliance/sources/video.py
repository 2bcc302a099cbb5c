"""video: frames from OpenCV's VideoCapture: a V4L2/UVC camera (its index or /dev/videoN), an RTSP or HTTP
stream, or a video file (played to its end, then again after the backoff)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from appliance.sources.base import Acquired, Source, SourceSettings

if TYPE_CHECKING:
    import cv2


class VideoSettings(SourceSettings):
    type: Literal["video"]
    url: str | int = Field(description="a camera index (0), a device (/dev/video0), rtsp://..., or a file path")
    rate: float | None = Field(None, gt=0, le=1000, description="frames per second read at most (files play "
                               "as fast as they decode without it); a live camera gives its own rate")
    width: int | None = Field(None, ge=1, le=65535, description="asked of a camera (CAP_PROP_FRAME_WIDTH)")
    height: int | None = Field(None, ge=1, le=65535)


class VideoSource(Source[VideoSettings]):
    settings_model = VideoSettings
    capture: cv2.VideoCapture | None = None

    def open(self) -> None:
        # Imported here: loading a project's configuration reads these settings and must not import OpenCV.
        import cv2

        url = self.settings.url
        self.capture = cv2.VideoCapture(url)
        if not self.capture.isOpened():
            raise OSError(f"cannot open {url!r}")
        if self.settings.width:
            self.capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.settings.width)
        if self.settings.height:
            self.capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.settings.height)

    def frames(self) -> Iterator[Acquired]:
        import cv2

        assert self.capture is not None
        period = 1 / self.settings.rate if self.settings.rate else 0.0
        next_at = time.monotonic()
        number = 0
        while not self.stopping:
            # A frame the pipeline has no room for is taken from the stream (grab) but not decoded (retrieve).
            room = self.has_room()
            ok = self.capture.grab()
            image = self.capture.retrieve()[1] if ok and room else None
            if not ok or room and image is None:
                return
            number += 1
            yield Acquired(image, str(int(self.capture.get(cv2.CAP_PROP_POS_FRAMES)) or number), time.time())
            if period:
                next_at += period
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                else:
                    next_at = time.monotonic()

    def close(self) -> None:
        capture, self.capture = self.capture, None
        if capture is not None:
            capture.release()
