"""What every frame source shares: its settings and the acquisition loop that feeds the flow.

A source reads frames in a thread of its own (cameras and files block) and hands each to the event loop, which
inspects it through the same queue and workers as an HTTP request (`core.inspect`) and offers the result to the
outputs. A frame that arrives while `in_flight` of this source's frames are still being inspected (or on their way
to the event loop) is dropped and counted: the line's rate is the camera's, never a queue that grows; a kind asks
`has_room()` first, so that such a frame is not even copied out of the camera or decoded. A kind whose frames can
wait where they are waits for room instead (`wait_for_room`): a camera's frames in its own buffers, bounded
(genicam: while fewer than `backlog` newer frames wait behind them), a folder's files on the disk; so a frame is
dropped only when the inspection is really behind, not because a result was on its way back to the event loop
when the next frame came. A source that fails (a camera unplugged, a stream gone) is opened again after a
backoff, and reported on /health and in the metrics meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from appliance.errors import ApplianceError

log = logging.getLogger("appliance.sources")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class SourceSettings(BaseModel):
    """Settings every source has; each kind adds its own fields and a `type: Literal["kind"]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="for metrics, logs and the frames' "
                             "`source`; default: the type and its position, e.g. folder-0")
    in_flight: PositiveInt = Field(2, le=64, description="frames of this source inspected at once; a frame "
                                   "arriving when they are all busy is dropped")
    capability: str | None = Field(None, description="inspect with this capability's flow instead of the "
                                   "project's flow")


@dataclass
class Acquired:
    """One frame from a source: BGR or gray pixels, the source's own id and time for it."""

    # None: the frame arrived while the pipeline had no room for it (`Source.has_room`) and was not read out; it
    # is counted as acquired and dropped.
    image: np.ndarray | None
    frame_id: str
    timestamp: float  # seconds since the epoch, as the source stamped the frame (else when it was read)
    path: str | None = None  # a file the frame came from (folder sources move it after inspection)
    # More of the source's own facts for `context["data"]`, e.g. a camera's timestamp on its own clock.
    extra: dict[str, Any] = field(default_factory=dict)


class SourceMetrics(Protocol):
    def source_frame(self, source: str, outcome: str) -> None: ...


SettingsT = TypeVar("SettingsT", bound=SourceSettings)


class Source(Generic[SettingsT]):
    """A configured source. Kinds implement `open`, `frames` (a blocking iterator, run in the source's thread)
    and `close`; `done` is called on the event loop after each frame's inspection."""

    settings_model: ClassVar[type[SourceSettings]]

    def __init__(self, name: str, settings: SettingsT, metrics: SourceMetrics | None = None,
                 project_dir: Path | None = None):
        self.name = name
        self.settings = settings
        self.metrics = metrics
        # Relative paths in the settings (a folder, a video file) are relative to the project folder.
        self.project_dir = project_dir or Path(".")
        self.acquired = self.dropped = self.failed = 0
        self.connected = False
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Frames the event loop took (written by the loop only); `acquired` (written by the source's thread only)
        # counts those handed to it: their difference is what waits in the loop's queue, without a lock.
        self.reached_loop = 0
        self._busy: Callable[[], int] = lambda: 0
        # Set on the event loop whenever room may have appeared (a frame of this source left the pipeline or was
        # taken by the loop); the source's thread waits on it in `wait_for_room`.
        self._room = threading.Event()

    # --- what a kind implements ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the camera, stream or folder (in the source's thread); raise when it is not there."""

    def frames(self) -> Iterator[Acquired]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the camera (in the source's thread); never raises."""

    def done(self, frame: Acquired, result: bool | None) -> None:
        """After the frame's inspection (None when it failed), on the event loop; e.g. move the file."""

    def trigger(self) -> int:
        """Take one frame now (`POST /sources/{name}/trigger`; called in a thread, it may block on the device);
        returns the triggers sent so far. Only a camera in software-trigger mode can; the others answer 409."""
        raise ApplianceError(f"source {self.name} ({self.settings.type}) takes no triggers; a genicam source with "
                             "`trigger: software` does", status=409)

    # --- the acquisition loop -----------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self, loop: asyncio.AbstractEventLoop, deliver: Any, busy: Callable[[], int] | None = None) -> None:
        """Read frames in a thread; ``deliver(source, frame)`` is called on ``loop`` for each. ``busy()``: how
        many of this source's frames are being inspected."""
        if busy is not None:
            self._busy = busy
        self._thread = threading.Thread(target=self._read, args=(loop, deliver), name=f"source {self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._room.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def has_room(self) -> bool:
        """Whether a frame read now would be inspected rather than dropped: fewer than `in_flight` of this source's
        frames are being inspected or waiting for the event loop. Called in the source's thread before the costly
        part of reading a frame; a frame without room is yielded with no image. Only a hint: the event loop
        decides again when the frame reaches it."""
        return self.acquired - self.reached_loop + self._busy() < self.settings.in_flight

    def wait_for_room(self, timeout: float) -> bool:
        """Wait in the source's thread, at most ``timeout`` seconds, until `has_room()`; False when there is still
        none (or the source is stopping). A kind that can keep a frame waiting where it is calls this in a loop
        with its own bound."""
        deadline = time.monotonic() + timeout
        while not self.has_room():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                return False
            self._room.clear()
            if self.has_room():  # room came between the check and the clear: its signal was cleared with it
                return True
            self._room.wait(remaining)
        return True

    def room_freed(self) -> None:
        """On the event loop: one of this source's frames left the pipeline (or was dropped there)."""
        self._room.set()

    def count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.source_frame(self.name, outcome)

    def _read(self, loop: asyncio.AbstractEventLoop, deliver: Any) -> None:
        backoff = BACKOFF_FIRST_S
        while not self._stop.is_set():
            try:
                self.open()
                self.connected = True
                if self.last_error is not None:
                    log.info("source %s: open again", self.name)
                self.last_error = None
                backoff = BACKOFF_FIRST_S
                for frame in self.frames():
                    if self._stop.is_set():
                        break
                    self.acquired += 1
                    loop.call_soon_threadsafe(deliver, self, frame)
                else:
                    if not self._stop.is_set():
                        raise EOFError("no more frames")
            except Exception as error:  # noqa: BLE001 - a camera's failure is retried and reported, never raised
                reason = f"{type(error).__name__}: {str(error)[:200]}"
                if reason != self.last_error:
                    log.warning("source %s: %s; opening it again in %.1f s", self.name, reason, backoff)
                self.last_error = reason
                self.failed += 1
                loop.call_soon_threadsafe(self.count, "failed")
            finally:
                self.connected = False
                self.close()
            if self._stop.wait(backoff):
                break
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    def health(self) -> dict[str, Any]:
        return {"type": self.settings.type, "connected": self.connected, "acquired": self.acquired,
                "dropped": self.dropped, "failed": self.failed, "last_error": self.last_error}


def now() -> float:
    return time.time()
