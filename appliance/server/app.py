"""The aiohttp application of one project: PEKAT's endpoints, health, metrics, and the error middleware."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from appliance import __version__, frames
from appliance.context import Context
from appliance.errors import (
    ApplianceError,
    BadRequest,
    ClientGone,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
)
from appliance.project import Project
from appliance.runtime.store import StoreError, switch_current
from appliance.server import params
from appliance.server.answer import Answer, build_answer
from appliance.server.auth import require_key
from appliance.server.body import CLOSE, check_declared_size, read_body, read_multipart_file
from appliance.telemetry.logs import redact_query
from appliance.telemetry.metrics import Metrics
from appliance.threads import started_pool

log = logging.getLogger("appliance.server")

ENDPOINTS = ("/analyze_image", "/analyze_raw_image", "/analyze_image_shared_memory", "/ping", "/version",
             "/health", "/health/live", "/health/ready", "/metrics", "/stop", "/models/switch", "/last_image")


@dataclass
class ServerState:
    project: Project
    stop_key: str | None
    metrics: Metrics
    workers: ThreadPoolExecutor
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
    semaphore: asyncio.Semaphore = field(init=False)
    # The query parameters the flow's nodes let a request set, with their ranges (fixed by the flow).
    override_ranges: dict[str, tuple[float, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.slots)
        self.override_ranges = self.project.override_ranges


STATE = web.AppKey("state", ServerState)
# Request ids: unique per process start, cheaper than uuid4 (a getrandom call) on every request.
_REQUEST_PREFIX = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"
_request_numbers = itertools.count(1)


# appliance_rejected_requests_total{reason}: a fixed set, by the status of the refusal.
REJECTION_REASONS = {400: "bad_input", 415: "bad_input", 401: "unauthorized", 403: "forbidden", 408: "body_timeout",
                     413: "too_large"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    response = web.json_response({"status": status, "message": message, "data": None}, status=status,
                                 headers=headers)
    if headers and headers.get("Connection") == "close":
        response.force_close()
    return response


def _route_name(request: web.Request) -> str:
    """A bounded label for metrics and logs: the route, never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def access_log(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
    """Outermost: request id, metrics and one log line per request, with secrets redacted (RELIABILITY 15)."""
    state = request.app[STATE]
    request_id = request.headers.get("X-Request-Id", "")[:64] or f"{_REQUEST_PREFIX}-{next(_request_numbers):x}"
    started = time.perf_counter()
    task = asyncio.current_task()
    assert task is not None
    state.handlers.add(task)
    try:
        response = await handler(request)
    finally:
        state.handlers.discard(task)
    duration = time.perf_counter() - started
    endpoint = _route_name(request)
    response.headers["X-Request-Id"] = request_id
    state.metrics.requests.labels(endpoint, str(response.status)).inc()
    state.metrics.request_duration.labels(endpoint).observe(duration)
    # One line per request at DEBUG; every refused or failed one at WARNING (RELIABILITY 15).
    level = logging.DEBUG if response.status < 400 else logging.WARNING
    if log.isEnabledFor(level):
        peer = request.transport.get_extra_info("peername") if request.transport else None
        log.log(level, "%s %s %s", request.method, request.path, response.status, extra={
            "request_id": request_id, "endpoint": endpoint, "status": response.status, "method": request.method,
            "duration_ms": round(duration * 1000, 2), "peer": peer[0] if peer else None,
            "query": redact_query(request.rel_url.raw_query_string)[:500], "project": state.project.name})
    return response


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
    """Every failure becomes {"status", "message", "data": null} with the same HTTP status."""
    try:
        return await handler(request)
    except ClientGone as gone:
        request.app[STATE].metrics.client_disconnects.labels(gone.phase).inc()
        log.debug("client %s", gone.message)
        return error_response(gone.status, gone.message)
    except ApplianceError as error:
        metrics = request.app[STATE].metrics
        if isinstance(error, Unauthorized):
            metrics.auth_failures.inc()
        if error.status in REJECTION_REASONS:  # 503s are counted where they are raised, with their reason
            metrics.rejected.labels(REJECTION_REASONS[error.status]).inc()
        return error_response(error.status, error.message, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        path = request.path[:200]
        if error.status == 404:
            message = f"no endpoint at {path}; endpoints: {', '.join(ENDPOINTS)}"
            return error_response(404, message)
        if error.status == 405:
            allowed = error.headers.get("Allow", "")
            return error_response(405, f"method {request.method} is not allowed on {path}; use {allowed}",
                                  {"Allow": allowed})
        if error.status == 413:
            request.app[STATE].metrics.rejected.labels("too_large").inc()
            limit = request.app[STATE].project.config.limits.body_bytes
            return error_response(413, f"body exceeds max_body_bytes {limit}", CLOSE)
        return error_response(error.status, error.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error on %s", request.path[:200])
        return error_response(500, "internal error; the appliance log has the details")


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Refuse an oversized upload before inviting it with `100 Continue` (RELIABILITY 2.9)."""
    limits = request.app[STATE].project.config.limits
    try:
        check_declared_size(request, limits)
    except PayloadTooLarge as error:
        request.app[STATE].metrics.rejected.labels("too_large").inc()
        return error_response(error.status, error.message, error.headers)
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


def is_loopback(peer: tuple | None) -> bool:
    """From the socket's own peer address, never from headers such as X-Forwarded-For (RELIABILITY 6.1)."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _admit(state: ServerState) -> None:
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


async def _process(request: web.Request, state: ServerState, work: Callable[[], Answer]) -> web.Response:
    """Wait for a worker within the queue timeout, then decode, inspect and encode in the worker thread."""
    _admit(state)
    limits = state.project.config.limits
    state.waiting += 1
    state.metrics.queue_depth.inc()
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
        state.metrics.queue_depth.dec()
    try:
        if request.transport is None or request.transport.is_closing():
            raise ClientGone("queued")
        state.in_flight += 1
        state.metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            answer = await asyncio.get_running_loop().run_in_executor(state.workers, work)
        finally:
            state.service_seconds += 0.1 * (time.perf_counter() - started - state.service_seconds)
            state.last_progress = time.monotonic()
            state.in_flight -= 1
            state.metrics.in_flight.dec()
        if request.transport is None or request.transport.is_closing():
            raise ClientGone("inference")
    finally:
        state.semaphore.release()
    return web.Response(body=answer.body, content_type=answer.content_type, headers=answer.headers)


def _worker(state: ServerState, decode: Callable[[], frames.Frame], query: params.AnalyzeParams,
            started: float, received: float | None = None) -> Callable[[], Answer]:
    """The work of one analyze request in a worker thread; ``received``: when its body was read, if any."""
    project = state.project
    settings = project.config.image_response
    code_nodes = {node_id for node_id, node in project.graph.nodes.items() if node.settings.type == "code@1"}

    stages = state.metrics.stages
    if received is not None:
        stages["receive"].observe(received - started)

    def work() -> Answer:
        decoding = time.perf_counter()
        frame = decode()
        inspecting = time.perf_counter()
        stages["decode"].observe(inspecting - decoding)
        ctx = project.inspect(frame, query.data, query.request)
        encoding = time.perf_counter()
        stages["flow"].observe(encoding - inspecting)
        state.last = ctx
        verdict = "ok" if ctx.get("result") else "ng"
        state.metrics.verdicts.labels(verdict).inc()
        for error in ctx.get("errors", []):
            node = error.get("node") if isinstance(error, dict) else None
            if node in code_nodes and "type" in error:
                state.metrics.hook_errors.labels(node).inc()
        ctx["completeTime"] = time.perf_counter() - started
        answer = build_answer(ctx, query.response_type, context_in_body=query.context_in_body,
                              image_format=query.image_format or settings.format,
                              jpeg_quality=query.jpeg_quality or settings.jpeg_quality)
        stages["encode"].observe(time.perf_counter() - encoding)
        return answer

    return work


def _begin(request: web.Request) -> tuple[ServerState, dict[str, bytes], params.AnalyzeParams]:
    state = request.app[STATE]
    query = params.parse_query(request.rel_url.raw_query_string)
    require_key(request, query, state.project.api_key)
    analyze = params.analyze_params(query, max_data_bytes=state.project.config.limits.max_data_bytes,
                                    ranges=state.override_ranges)
    return state, query, analyze


def _frame_size(query: dict[str, bytes], state: ServerState) -> tuple[int, int]:
    width, height = params.dimension(query, "width"), params.dimension(query, "height")
    limit = state.project.config.limits.max_frame_pixels
    if width * height > limit:
        raise PayloadTooLarge(f"frame {width}x{height} = {width * height} pixels exceeds this project's "
                              f"max_frame_pixels {limit}", headers=CLOSE)
    return width, height


async def analyze_image(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, _, query = _begin(request)
    _admit(state)
    limits = state.project.config.limits
    body: bytes | bytearray
    if request.content_type == "multipart/form-data":
        body = await read_multipart_file(request, limits)
    else:
        body = await read_body(request, limits)
    color = state.project.config.color

    def decode() -> frames.Frame:
        return frames.decode_image(body, max_frame_pixels=limits.max_frame_pixels, color=color)

    return await _process(request, state, _worker(state, decode, query, started, time.perf_counter()))


async def analyze_raw_image(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, raw_query, query = _begin(request)
    width, height = _frame_size(raw_query, state)
    bayer = params.flag(raw_query, "bayer")
    _admit(state)
    body = await read_body(request, state.project.config.limits)
    color = state.project.config.color

    def decode() -> frames.Frame:
        return frames.raw_frame(body, width, height, bayer=bayer, color=color)

    return await _process(request, state, _worker(state, decode, query, started, time.perf_counter()))


async def analyze_shared_memory(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, raw_query, query = _begin(request)
    if not is_loopback(request.transport.get_extra_info("peername") if request.transport else None):
        raise Forbidden("shared memory is only available to clients on this machine")
    width, height = _frame_size(raw_query, state)
    name = raw_query.get("name")
    if name is None:
        raise BadRequest("missing query parameter 'name'")
    try:
        name_text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid shared memory name") from None
    # No body is expected; any that was sent is left unread, and the connection closed after the answer (1.15).
    check_declared_size(request, state.project.config.limits)
    color = state.project.config.color

    def decode() -> frames.Frame:
        return frames.read_shared_memory(name_text, width, height, color=color)

    response = await _process(request, state, _worker(state, decode, query, started))
    if request.can_read_body:
        response.force_close()
    return response


async def last_image(request: web.Request) -> web.Response:
    """GET /last_image: the last analysed frame's answer again, in any response type (PROTOCOL.md 1)."""
    state, _, query = _begin(request)
    ctx = state.last
    if ctx is None:
        raise NotFound("no frame has been analysed yet")
    settings = state.project.config.image_response
    answer = await asyncio.get_running_loop().run_in_executor(state.workers, lambda: build_answer(
        ctx, query.response_type, context_in_body=query.context_in_body,
        image_format=query.image_format or settings.format, jpeg_quality=query.jpeg_quality or settings.jpeg_quality))
    return web.Response(body=answer.body, content_type=answer.content_type, headers=answer.headers)


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


# The PEKAT version whose API we speak; our own version rides in the PEP 440 local label, which the 2.3.3
# client's packaging.version still reads as >= 3.18.0 (so it uses shared memory).
PEKAT_VERSION = f"3.18.0+appliance.{__version__}"


async def version(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STATE].project.config.version_reply or PEKAT_VERSION)


async def health_live(request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})


async def health_ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    project = state.project
    if state.draining:
        raise ServiceUnavailable("not ready: shutting down")
    if not state.ready:
        raise ServiceUnavailable(f"not ready: preparing the flow's nodes ({project.ready_nodes} of "
                                 f"{project.node_count} ready)")
    limit = project.config.limits.max_stuck_hooks
    if project.stuck_hooks >= limit:
        raise ServiceUnavailable(f"not ready: {project.stuck_hooks} Code hooks are stuck (limit {limit}); "
                                 "restart the service")
    return web.json_response({"status": "ready", "project": project.name, "nodes": project.node_count})


async def health(request: web.Request) -> web.Response:
    """GET /health: what an operator asks first, as JSON: ready or why not, and each model's version and device,
    with the version a switch failed to load (RELIABILITY 12.3)."""
    state = request.app[STATE]
    project = state.project
    models = {}
    for slot in project.runtime.slots.values():
        entry: dict[str, object] = {"version": slot.current.version if slot.current else None,
                                    "device": slot.options.device}
        if slot.failed_version is not None:
            entry["pending_version_failed"] = slot.failed_version
        models[slot.name] = entry
    status = "draining" if state.draining else "ready" if state.ready else "starting"
    return web.json_response({"status": status, "project": project.name, "nodes": project.node_count,
                              "ready_nodes": project.ready_nodes, "in_flight": state.in_flight,
                              "queued": state.waiting, "stuck_hooks": project.stuck_hooks, "models": models})


async def metrics_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.project.config.metrics.loopback_only and not is_loopback(
            request.transport.get_extra_info("peername") if request.transport else None):
        raise Forbidden("metrics are served to this machine only (metrics.loopback_only in project.yaml)")
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def stop(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.stop_key is None:
        raise Forbidden("stop is disabled for this project")
    query = params.parse_query(request.rel_url.raw_query_string)
    given = query.get("key")
    if given is None or not hmac.compare_digest(given, state.stop_key.encode("utf-8")):
        raise Unauthorized("wrong or missing stop key")
    # Answer first, then stop: the PEKAT client raises ConnectionError if the connection drops unanswered.
    asyncio.get_running_loop().call_later(0.2, state.stop_requested.set)
    return web.json_response({"status": 200, "message": "stopping", "data": None})


async def switch_model(request: web.Request) -> web.Response:
    """POST /models/switch?model=NAME&version=V: load V beside the running version, swap, keep the pointer."""
    state = request.app[STATE]
    query = params.parse_query(request.rel_url.raw_query_string)
    require_key(request, query, state.project.api_key)
    name = params.text(query, "model")
    version = params.text(query, "version")
    slots = [slot for slot in state.project.runtime.slots.values() if slot.name == name]
    if not slots:
        known = ", ".join(sorted({slot.name for slot in state.project.runtime.slots.values()})) or "none"
        raise BadRequest(f"model '{name}' is not used by this project's flow; models: {known}")
    loop = asyncio.get_running_loop()
    previous = slots[0].current.version if slots[0].current else None
    try:
        for slot in slots:
            # Compiling takes seconds: a thread of its own, never a worker that frames are waiting for.
            await loop.run_in_executor(None, slot.switch, version)
    except StoreError as error:
        log.error("model %s: version %s not loaded, the old one keeps serving: %s", name, version, error)
        raise BadRequest(str(error)) from None
    switch_current(state.project.runtime.store / name, version)
    state.metrics.describe_models(state.project.runtime)
    return web.json_response({"status": 200, "message": f"model {name}: {previous} -> {version}",
                              "data": {"model": name, "version": version, "previous": previous}})


async def _follow_model_pointers(app: web.Application) -> None:
    """Notice `current` pointers moved by `appliance models switch` (or a deployment tool) every 2 s."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(2)
        if state.ready and not state.draining:
            changed = await loop.run_in_executor(None, state.project.runtime.refresh)
            if changed:
                state.metrics.describe_models(state.project.runtime)


def queue_depth(project: Project, workers: int) -> int:
    """The configured depth, else 2 x the inference slots of the flow's loaded models (RELIABILITY 8), else
    2 x the worker threads (no model, or before the models are loaded)."""
    if project.config.limits.queue_depth:
        return project.config.limits.queue_depth
    model_slots = [slot.current.slots for slot in project.runtime.slots.values() if slot.current is not None]
    return 2 * (max(model_slots) if model_slots else workers)


def create_app(project: Project, *, stop_key: str | None = None, workers: int | None = None) -> web.Application:
    limits = project.config.limits
    slots = workers or max(1, os.cpu_count() or 1)
    # Long request lines: a `data` value up to max_data_bytes, fully percent-encoded, must fit (RELIABILITY 1.9).
    # keepalive: aiohttp's default keeps an idle connection for an hour (2.7).
    app = web.Application(middlewares=[access_log, errors], client_max_size=limits.body_bytes,
                          handler_args={"max_line_size": 65536, "max_field_size": 65536, "keepalive_timeout": 15})
    metrics = Metrics(project.name, project.flow_sha256)
    project.runtime.observer = metrics
    project.runner.observe_node = metrics.node
    metrics.stuck_hooks.set_function(lambda: project.stuck_hooks)
    app[STATE] = ServerState(
        project=project, stop_key=stop_key, metrics=metrics,
        workers=started_pool(slots, "worker"), slots=slots,
        queue_depth=queue_depth(project, slots))
    for path, handler in (("/analyze_image", analyze_image), ("/analyze_raw_image", analyze_raw_image),
                          ("/analyze_image_shared_memory", analyze_shared_memory)):
        app.router.add_post(path, handler, expect_handler=expect_continue)
    app.router.add_get("/last_image", last_image)
    app.router.add_get("/ping", ping)
    app.router.add_get("/version", version)
    app.router.add_get("/stop", stop)
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", health_live)
    app.router.add_get("/health/ready", health_ready)
    if project.config.metrics.enabled:
        app.router.add_get("/metrics", metrics_page)
    app.router.add_post("/models/switch", switch_model)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        follower = asyncio.create_task(_follow_model_pointers(app))
        yield
        follower.cancel()
        app[STATE].workers.shutdown(wait=False, cancel_futures=True)
        project.close()

    app.cleanup_ctx.append(lifecycle)
    return app

