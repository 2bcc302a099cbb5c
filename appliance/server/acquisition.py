"""Frames that the appliance acquires itself (project.yaml `sources:`), inspected through the serving core.

Each source reads in its own thread and hands frames to the event loop (`deliver`), which inspects them through
the same queue, deadline and workers as HTTP requests and offers the results to the outputs. Sources start once
the project is ready; a frame that finds this source's `in_flight` frames all busy, or the core's queue full, is
dropped and counted, never queued without bound. A gray frame (a Mono8 camera) reaches a flow whose every node
takes gray as it is, without the BGR conversion of the project's `color: bgr` (`takes_gray`). The frame's source,
id and time reach the flow as `context["data"]` (JSON), so a Code hook or an output can tell frames apart.
`POST /sources/{name}/trigger` takes one frame from a camera in software-trigger mode.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any

from aiohttp import web

from appliance import frames
from appliance.errors import ApplianceError, NotFound
from appliance.project import Project
from appliance.server import core
from appliance.server.auth import require_key
from appliance.server.core import STATE, ServerState
from appliance.server.dialects.pekat import params
from appliance.server.inspection import Inspection
from appliance.server.render import Answer
from appliance.sources.base import Acquired, Source

log = logging.getLogger("appliance.sources")

def takes_gray(project: Project, capability: str | None) -> bool:
    """Whether the flow that inspects a source's frames (the project's, or the capability's) may get them gray."""
    runner = project.runner if capability is None else project.capabilities.get(capability)
    return runner is not None and runner.takes_gray


class Acquisition:
    def __init__(self, state: ServerState, sources: list[Source[Any]]):
        self.state = state
        self.sources = sources
        self.busy = {source.name: 0 for source in sources}
        self.tasks: set[asyncio.Task] = set()
        # Per source: done once its latest frame has reached the outputs (the next one's results wait for it).
        self.offered: dict[str, asyncio.Future[None]] = {}

    async def run(self) -> None:
        """Start every source once the project is ready (a folder's files must not be dropped while it starts)."""
        while not self.state.ready:
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        for source in self.sources:
            source.start(loop, self.deliver, busy=functools.partial(self.busy.__getitem__, source.name))

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(source.stop) for source in self.sources))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def deliver(self, source: Source[Any], frame: Acquired) -> None:
        source.reached_loop += 1
        source.count("acquired")
        if frame.image is None or self.state.draining or self.busy[source.name] >= source.settings.in_flight:
            source.dropped += 1
            source.count("dropped")
            source.room_freed()
            return
        self.busy[source.name] += 1
        task = asyncio.create_task(self._inspect(source, frame))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _inspect(self, source: Source[Any], frame: Acquired) -> None:
        state = self.state
        verdicts: list[bool] = []
        image = frame.image
        assert image is not None  # deliver() drops frames that were not read out
        project, capability = state.project, source.settings.capability
        gray_as_is = image.ndim == 2 and takes_gray(project, capability)

        def decode() -> frames.Frame:
            return frames.Frame(image if gray_as_is else frames.to_color_mode(image, project.config.color),
                                source.name, [])

        def render(inspection: Inspection) -> Answer:
            verdicts.append(inspection.verdict)
            return Answer(b"", "text/plain")

        data = json.dumps({"source": source.name, "frame_id": frame.frame_id, "timestamp": frame.timestamp,
                           **frame.extra})
        previous = self.offered.get(source.name)
        offered = self.offered[source.name] = asyncio.get_running_loop().create_future()
        try:
            await core.inspect(None, state, decode, render, data=data, capability=source.settings.capability,
                               source=source.name, offer_after=previous)
            source.count("inspected")
        except ApplianceError as error:
            # The core refused it (queue full, deadline, shutting down): a dropped frame, not a failed camera.
            source.dropped += 1
            source.count("dropped")
            log.debug("source %s: frame %s not inspected: %s", source.name, frame.frame_id, error.message)
        finally:
            if not offered.done():
                offered.set_result(None)
            self.busy[source.name] -= 1
            source.room_freed()
            source.done(frame, verdicts[0] if verdicts else None)


ACQUISITION = web.AppKey("acquisition", Acquisition)


async def trigger_source(request: web.Request) -> web.Response:
    """POST /sources/{name}/trigger: one frame from that camera now (a genicam source with `trigger: software`);
    the frame is inspected and sent to the outputs like every other, the answer only says the trigger went out."""
    state = request.app[STATE]
    require_key(request, params.parse_query(request.rel_url.raw_query_string), state.project.api_keys)
    name = request.match_info["name"]
    sources = {source.name: source for source in request.app[ACQUISITION].sources}
    source = sources.get(name)
    if source is None:
        raise NotFound(f"no source named {name[:100]!r}; sources: {', '.join(sources) or 'none'}")
    # A trigger is a register write to the camera (a network round trip, seconds when it is gone): not on the loop.
    triggers = await asyncio.to_thread(source.trigger)
    return web.json_response({"status": 200, "message": f"source {name}: trigger sent",
                              "data": {"source": name, "triggers": triggers}})
