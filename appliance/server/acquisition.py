"""Frames that the appliance acquires itself (project.yaml `sources:`), inspected through the serving core.

Each source reads in its own thread and hands frames to the event loop (`deliver`), which inspects them through
the same queue, deadline and workers as HTTP requests and offers the results to the outputs. Sources start once
the project is ready; a frame that finds this source's `in_flight` frames all busy, or the core's queue full, is
dropped and counted, never queued without bound. The frame's source, id and time reach the flow as
`context["data"]` (JSON), so a Code hook or an output can tell frames apart.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from appliance import frames
from appliance.errors import ApplianceError
from appliance.server import core
from appliance.server.core import ServerState
from appliance.server.inspection import Inspection
from appliance.server.render import Answer
from appliance.sources.base import Acquired, Source

log = logging.getLogger("appliance.sources")


class Acquisition:
    def __init__(self, state: ServerState, sources: list[Source[Any]]):
        self.state = state
        self.sources = sources
        self.busy = {source.name: 0 for source in sources}
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Start every source once the project is ready (a folder's files must not be dropped while it starts)."""
        while not self.state.ready:
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        for source in self.sources:
            source.start(loop, self.deliver)

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(source.stop) for source in self.sources))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def deliver(self, source: Source[Any], frame: Acquired) -> None:
        source.count("acquired")
        if self.state.draining or self.busy[source.name] >= source.settings.in_flight:
            source.dropped += 1
            source.count("dropped")
            return
        self.busy[source.name] += 1
        task = asyncio.create_task(self._inspect(source, frame))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _inspect(self, source: Source[Any], frame: Acquired) -> None:
        state = self.state
        verdicts: list[bool] = []
        color = state.project.config.color

        def decode() -> frames.Frame:
            return frames.Frame(frames.to_color_mode(frame.image, color), source.name, [])

        def render(inspection: Inspection) -> Answer:
            verdicts.append(inspection.verdict)
            return Answer(b"", "text/plain")

        data = json.dumps({"source": source.name, "frame_id": frame.frame_id, "timestamp": frame.timestamp})
        try:
            await core.inspect(None, state, decode, render, data=data, capability=source.settings.capability,
                               source=source.name)
            source.count("inspected")
        except ApplianceError as error:
            # The core refused it (queue full, deadline, shutting down): a dropped frame, not a failed camera.
            source.dropped += 1
            source.count("dropped")
            log.debug("source %s: frame %s not inspected: %s", source.name, frame.frame_id, error.message)
        finally:
            self.busy[source.name] -= 1
            source.done(frame, verdicts[0] if verdicts else None)
