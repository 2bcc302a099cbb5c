"""The live view: the frames the line sends, as inspected, pushed to every open page at most `live_fps` times a
second, the latest frame winning.

The worker's part (``observe``) is two assignments and an Event.set(), and nothing at all while no page
watches. Drawing and JPEG encoding happen in the console's own thread, at a lower priority than the workers
(background.py), at most `live_fps` times a second whatever the line's rate; each page has a queue of one, so a
slow browser gets the newest frame and never a backlog.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from typing import Any

import numpy as np

from appliance.console import views
from appliance.console.background import lower_this_thread
from appliance.context import Context

log = logging.getLogger("appliance.console")


class LiveView:
    def __init__(self, fps: float):
        self.interval = 1.0 / fps
        self._pages: set[asyncio.Queue[bytes]] = set()
        self._latest: tuple[Context, float] | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="console-live", daemon=True)
        self._numbers = itertools.count(1)
        self.pushed = 0

    @property
    def watched(self) -> bool:
        return bool(self._pages)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def observe(self, image: np.ndarray, ctx: Context, capability: str | None) -> None:
        """In the worker thread, after every inspection of the project's flow."""
        if not self._pages or capability is not None:
            return
        self._latest = (ctx, time.time())
        self._wake.set()

    def subscribe(self, last: Context | None = None) -> asyncio.Queue[bytes]:
        """A queue for one page; ``last``: the frame inspected last, drawn at once so a new page is not blank."""
        page: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        self._pages.add(page)
        if last is not None and self._latest is None:
            self._latest = (last, time.time())
            self._wake.set()
        return page

    def unsubscribe(self, page: asyncio.Queue[bytes]) -> None:
        self._pages.discard(page)

    def _publish(self, payload: bytes) -> None:
        """On the event loop: every page gets the newest frame in place of one it has not taken yet."""
        for page in self._pages:
            if page.full():
                page.get_nowait()
            page.put_nowait(payload)

    def _run(self) -> None:
        lower_this_thread()
        last = 0.0
        while True:
            self._wake.wait()
            if self._stopping:
                return
            # Wait out the rest of the interval first: frames arriving meanwhile replace the one pending.
            pause = last + self.interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._wake.clear()
            latest, self._latest = self._latest, None
            if latest is None or self._stopping:
                continue
            last = time.monotonic()
            try:
                # The event as sent, made here once: the event loop only writes these bytes to each page.
                payload = b"event: frame\ndata: " + json.dumps(frame_payload(*latest, number=next(self._numbers))
                                                             ).encode() + b"\n\n"
            except Exception:  # noqa: BLE001 - a frame that cannot be drawn is skipped, the view goes on
                log.exception("live view: frame not drawn")
                continue
            loop = self._loop
            if loop is not None and not loop.is_closed():
                self.pushed += 1
                loop.call_soon_threadsafe(self._publish, payload)


def frame_payload(ctx: Context, at: float, number: int) -> dict[str, Any]:
    """What a page shows of one frame: the summary, and the annotated picture with and without the heat map."""
    payload = views.summary(ctx)
    payload["number"] = number
    payload["time"] = at
    payload["image"] = views.jpeg_data_url(views.preview(ctx, heat=False))
    payload["heat_image"] = views.jpeg_data_url(views.preview(ctx, heat=True)) if ctx.get("heatmaps") else None
    return payload
