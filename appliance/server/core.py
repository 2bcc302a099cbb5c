"""The serving core every API shares: the server's state, admission (queue, deadline, in-flight, Retry-After) and
the inspection of one frame in a worker thread. It knows no vendor: a dialect reads its own request, hands the
core a decoder and a renderer, and gets an Answer back (its renderer ran in the worker, off the event loop).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from aiohttp import web

from appliance import frames
from appliance.context import Context
from appliance.errors import ClientGone, PayloadTooLarge, ServiceUnavailable
from appliance.outputs.base import Message
from appliance.project import Project
from appliance.server.body import CLOSE, check_declared_size
from appliance.server.inspection import Inspection
from appliance.server.render import Answer
from appliance.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from appliance.outputs.base import Output
    from appliance.server.dialects.base import Dialect


log = logging.getLogger("appliance.server")
Result = TypeVar("Result")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class Workers:
    """The threads that decode, inspect and render frames: a fixed set started at once (RELIABILITY 13.4), fed by
    one queue, each result handed back to the event loop with one call_soon_threadsafe.

    run_in_executor on a ThreadPoolExecutor does the same through a concurrent Future chained to an asyncio one
    (locks, callbacks, a copy of the state): 85-150 us of CPU per hop, against 50-60 us this way (5000 hops of
    an empty job, measured on the 2-core development machine)."""

    def __init__(self, count: int, name: str):
        self._jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future, Callable[[], Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}_{index}", daemon=True)
                         for index in range(count)]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run_one(*job)
            del job  # no reference to the last job's frame, context or answer stays in an idle thread

    @staticmethod
    def _run_one(loop: asyncio.AbstractEventLoop, future: asyncio.Future, work: Callable[[], Any]) -> None:
        if future.cancelled():  # its request was cancelled while the job waited: nobody wants the result
            return
        try:
            result = work()
        except BaseException as error:  # noqa: BLE001 - raised again in the awaiting task, as run_in_executor does
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    async def run(self, work: Callable[[], Result]) -> Result:
        """``work()`` in a worker thread; its result or exception here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._jobs.put((loop, future, work))
        return await future

    def shutdown(self) -> None:
        """Drop the jobs not started (their requests are cancelled by the drain) and end every thread once its
        job is done, without waiting for it (a stuck Code hook may never return, RELIABILITY 10.4)."""
        try:
            while (job := self._jobs.get_nowait()) is not None:
                job[1].cancel()
        except queue.Empty:
            pass
        for _ in self._threads:
            self._jobs.put(None)


@dataclass
class ServerState:
    project: Project
    stop_key: str | None
    metrics: Metrics
    workers: Workers
    slots: int
    queue_depth: int
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    draining: bool = False
    waiting: int = 0
    in_flight: int = 0
    # Every request being handled, on any route: the drain waits for them and cancels what outlasts it (10.1, 10.5).
    handlers: set[asyncio.Task] = field(default_factory=set)
    # The context of the last analysed frame, for GET /last_image (one frame is kept, replaced by the next).
    last: Context | None = None
    # Moving mean of a request's time in a worker, for Retry-After when the queue is full.
    service_seconds: float = 0.05
    # When a worker last finished a request: the systemd watchdog pings only while workers progress.
    last_progress: float = field(default_factory=time.monotonic)
    # The APIs this project serves, by name (project.yaml `apis`).
    dialects: dict[str, Dialect] = field(default_factory=dict)
    # Where each inspection's result goes besides the answer (project.yaml `outputs`), started with the app.
    outputs: list[Output] = field(default_factory=list)
    inspections: int = 0
    # Called in the worker with (input frame, context, capability) after each inspection (the console's live
    # view, gallery and frame collection): each must only hand the references on, never encode or write here.
    observers: list[Callable[[np.ndarray, Context, str | None], None]] = field(default_factory=list)
    semaphore: asyncio.Semaphore = field(init=False)
    code_nodes: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.slots)
        self.code_nodes = frozenset(node.id for node in self.project.nodes if node.settings.type == "code@1")
        # appliance_ready, read at each scrape: what GET /health/ready answers (app.py `health_ready`).
        self.metrics.follow_readiness(lambda: self.ready and not self.draining and
                                      self.project.stuck_hooks < self.project.config.limits.max_stuck_hooks)
        self.metrics.follow_queue(lambda: self.waiting, lambda: self.in_flight)


STATE = web.AppKey("state", ServerState)
# route resource -> the dialect that owns it (every route of the app is in it).
ROUTE_OWNERS = web.AppKey("route_owners", dict)


def dialect_of(request: web.Request) -> Dialect:
    """The dialect of the route the request matched; for an unknown path or method, the API whose prefix it has,
    else the project's first API."""
    state = request.app[STATE]
    resource = request.match_info.route.resource
    owner = request.app[ROUTE_OWNERS].get(resource) if resource is not None else None
    if owner is not None:
        return owner
    for dialect in state.dialects.values():
        if any(request.path.startswith(prefix) for prefix in dialect.prefixes):
            return dialect
    return next(iter(state.dialects.values()))


def queue_depth(project: Project, workers: int) -> int:
    """The configured depth, else 2 x the inference slots of the flow's loaded models (RELIABILITY 8), else
    2 x the worker threads (no model, or before the models are loaded)."""
    if project.config.limits.queue_depth:
        return project.config.limits.queue_depth
    model_slots = [slot.current.slots for slot in project.runtime.slots.values() if slot.current is not None]
    return 2 * (max(model_slots) if model_slots else workers)
# Set by the access log for each request: its id (X-Request-Id) and the API of its route.
REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_API = web.RequestKey("api", str)


def mark_ready(state: ServerState) -> None:
    """The project's models are loaded: size the queue from their slots, publish them in the metrics, and answer
    inspections from now on (serve.py, right before it says STOP_INIT_MODEL)."""
    project = state.project
    state.metrics.describe_models(project.runtime)
    state.queue_depth = queue_depth(project, state.slots)
    state.ready = True
    log.info("ready: %d models loaded, queue depth %d", len(project.runtime.slots), state.queue_depth)


def is_loopback(peer: tuple | None) -> bool:
    """From the socket's own peer address, never from headers such as X-Forwarded-For (RELIABILITY 6.1)."""
    if not peer:
        return False
    return _address_is_loopback(str(peer[0]))


# A camera script asks from the same address again and again: parsing it costs 4-9 us per shared-memory request.
@functools.lru_cache(maxsize=256)
def _address_is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def peer_is_loopback(request: web.Request) -> bool:
    return is_loopback(request.transport.get_extra_info("peername") if request.transport else None)


def admit(state: ServerState) -> None:
    """Refuse at once what cannot be served: not ready, draining, or the queue full (RELIABILITY 8.1, 8.4)."""
    if state.draining:
        state.metrics.rejected.labels("draining").inc()
        raise ServiceUnavailable("shutting down", headers=CLOSE)
    if not state.ready:
        raise ServiceUnavailable(f"not ready: preparing the flow's nodes ({state.project.ready_nodes} of "
                                 f"{state.project.node_count} ready)", headers={"Retry-After": "1"})
    if state.waiting >= state.queue_depth:
        state.metrics.rejected.labels("queue_full").inc()
        # HTTP allows whole seconds only (RELIABILITY 8.1): the time to work off the queue, at least 1.
        retry = max(1, math.ceil(state.waiting * state.service_seconds / state.slots))
        raise ServiceUnavailable(f"busy: queue of {state.queue_depth} is full", headers={"Retry-After": str(retry)})


def readiness_problem(state: ServerState) -> str | None:
    """Why the server is not ready (what GET /health/ready and KServe's /v2/health/ready answer 503 with), or
    None when it is."""
    project = state.project
    if state.draining:
        return "not ready: shutting down"
    if not state.ready:
        return f"not ready: preparing the flow's nodes ({project.ready_nodes} of {project.node_count} ready)"
    limit = project.config.limits.max_stuck_hooks
    if project.stuck_hooks >= limit:
        return f"not ready: {project.stuck_hooks} Code hooks are stuck (limit {limit}); restart the service"
    return None


def frame_size_allowed(state: ServerState, width: int, height: int) -> None:
    limit = state.project.config.limits.max_frame_pixels
    if width * height > limit:
        raise PayloadTooLarge(f"frame {width}x{height} = {width * height} pixels exceeds this project's "
                              f"max_frame_pixels {limit}", headers=CLOSE)


async def in_worker(request: web.Request | None, state: ServerState, work: Callable[[], Answer]) -> Answer:
    """Wait for a worker within the queue timeout, then run ``work`` there. ``request``: the client whose
    departure makes the work pointless (None for work nobody waits on, such as a queued API task)."""
    admit(state)
    limits = state.project.config.limits
    state.waiting += 1
    try:
        try:
            if state.semaphore.locked():
                async with asyncio.timeout(limits.queue_timeout_s):
                    await state.semaphore.acquire()
            else:
                await state.semaphore.acquire()
        except TimeoutError:
            state.metrics.rejected.labels("deadline").inc()
            raise ServiceUnavailable(f"deadline exceeded: waited {limits.queue_timeout_s:g} s in queue",
                                     headers={"Retry-After": "1"}) from None
    finally:
        state.waiting -= 1
    try:
        if request is not None and (request.transport is None or request.transport.is_closing()):
            raise ClientGone("queued")
        state.in_flight += 1
        started = time.perf_counter()
        try:
            answer = await state.workers.run(work)
        finally:
            state.service_seconds += 0.1 * (time.perf_counter() - started - state.service_seconds)
            state.last_progress = time.monotonic()
            state.in_flight -= 1
        if request is not None and (request.transport is None or request.transport.is_closing()):
            raise ClientGone("inference")
    finally:
        state.semaphore.release()
    return answer


async def inspect(request: web.Request | None, state: ServerState, decode: Callable[[], frames.Frame],
                  render: Callable[[Inspection], Answer], *, data: str = "", options: dict[str, Any] | None = None,
                  capability: str | None = None, started: float | None = None,
                  received: float | None = None, source: str | None = None,
                  offer_after: Awaitable[None] | None = None) -> Answer:
    """Decode a frame, run the project's flow (or a capability's flow) on it and render the answer, all in a
    worker thread. ``options``: the validated node overrides and ``lang`` (see nodes/base.py `requested`);
    ``started``/``received``: when the request arrived and its body was read, for the stage metrics;
    ``offer_after``: done when the previous frame of the same camera has reached the outputs (they get a camera's
    results in its frame order, even when two of its frames are inspected at once)."""
    project = state.project
    stages = state.metrics.stages
    started = time.perf_counter() if started is None else started
    if received is not None:
        stages["receive"].observe(received - started)

    def work() -> Answer:
        decoding = time.perf_counter()
        frame = decode()
        inspecting = time.perf_counter()
        stages["decode"].observe(inspecting - decoding)
        ctx = project.inspect(frame, data, options, capability)
        encoding = time.perf_counter()
        stages["flow"].observe(encoding - inspecting)
        state.last = ctx
        for observer in state.observers:
            observer(frame.image, ctx, capability)
        state.metrics.verdict(bool(ctx.get("result")))
        state.metrics.observe_scores(ctx, project, capability)
        for error in ctx.get("errors", []):
            node = error.get("node") if isinstance(error, dict) else None
            if node in state.code_nodes and "type" in error:
                state.metrics.hook_errors.labels(node).inc()
        ctx["completeTime"] = time.perf_counter() - started
        inspection = Inspection(ctx, capability)
        if state.outputs:
            messages.append(output_message(inspection, state, request_id, origin))
        answer = render(inspection)
        stages["encode"].observe(time.perf_counter() - encoding)
        return answer

    messages: list[Message] = []
    request_id = request.get(REQUEST_ID, "") if request is not None else ""
    origin = source or (request.get(REQUEST_API, "http") if request is not None else (capability or "api"))
    try:
        return await in_worker(request, state, work)
    finally:
        # Also when the client left before its answer: the part was inspected, the line must hear of it.
        if offer_after is not None:
            await offer_after
        for message in messages:
            # Counted here, on the event loop, so the counter rises in the order the outputs send.
            state.inspections += 1
            message = replace(message, counter=state.inspections,
                              request_id=message.request_id or f"{origin}-{state.inspections}")
            for output in state.outputs:
                output.offer(message)


def output_message(inspection: Inspection, state: ServerState, request_id: str, source: str) -> Message:
    """What the outputs carry about one inspection (built in the worker; counted and offered on the event loop)."""
    labels = [label.name for label in inspection.labels if label.predicted]
    labels += [box.label for box in inspection.rectangles if box.label and box.label not in labels]
    return Message(result=inspection.verdict, request_id=request_id,
                   timestamp=time.time(), project=state.project.name, score=inspection.score,
                   threshold=inspection.threshold, rectangles=len(inspection.rectangles), labels=tuple(labels),
                   text="\n".join(line.text for line in inspection.text),
                   data=str(inspection.context.get("data") or ""),
                   models=tuple(dict(model) for model in inspection.models), source=source)


def response(answer: Answer) -> web.Response:
    return web.Response(body=answer.body, status=answer.status, content_type=answer.content_type,
                        headers=answer.headers)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Refuse an oversized upload before inviting it with `100 Continue` (RELIABILITY 2.9); the answer is in the
    shape of the route's API."""
    state = request.app[STATE]
    try:
        check_declared_size(request, state.project.config.limits)
    except PayloadTooLarge as error:
        state.metrics.rejected.labels("too_large").inc()
        return dialect_of(request).error_response(error)
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None
