"""The aiohttp application of one project: the APIs it serves (server/dialects/), the core's own routes (health,
metrics, model switching), and the one middleware every request passes: access log, metrics and error
rendering.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from appliance.errors import (
    ApplianceError,
    BadRequest,
    ClientGone,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
)
from appliance.outputs import OUTPUT_TYPES
from appliance.project import Project
from appliance.server import core
from appliance.server.acquisition import ACQUISITION, Acquisition, trigger_source
from appliance.server.auth import require_key
from appliance.server.body import CLOSE, media_type, read_body, read_form
from appliance.server.core import (
    REQUEST_API,
    REQUEST_ID,
    ROUTE_OWNERS,
    STATE,
    ServerState,
    Workers,
    dialect_of,
    queue_depth,
)
from appliance.server.dialects import DIALECTS
from appliance.server.dialects.base import Dialect
from appliance.server.dialects.pekat import params
from appliance.server.reload import RELOADS, Reloads, switch_version
from appliance.sources import SOURCE_TYPES
from appliance.telemetry.logs import redact_query
from appliance.telemetry.metrics import Metrics

log = logging.getLogger("appliance.server")

# Request ids: unique per process start, cheaper than uuid4 (a getrandom call) on every request.
_REQUEST_PREFIX = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"
_request_numbers = itertools.count(1)

# appliance_rejected_requests_total{reason}: a fixed set, by the status of the refusal.
REJECTION_REASONS = {400: "bad_input", 415: "bad_input", 401: "unauthorized", 403: "forbidden", 408: "body_timeout",
                     413: "too_large"}
# How often the pointer follower reads the models' `current` pointers (RELIABILITY 12.1).
DEFAULT_POINTER_POLL_S = 2.0


class Core(Dialect):
    """The core's own routes: health, metrics and model switching, in every project whatever APIs it serves."""

    name = "core"
    prefixes = ("/health", "/metrics", "/models/", "/faces/", "/sources/")

    def routes(self) -> list[web.RouteDef]:
        routes = [web.get("/health", health), web.get("/health/live", health_live),
                  web.get("/health/ready", health_ready), web.post("/models/switch", switch_model),
                  web.post("/faces/enrol", enrol_face, expect_handler=core.expect_continue),
                  web.post("/sources/{name}/trigger", trigger_source)]
        if self.state.project.config.metrics.enabled:
            routes.append(web.get("/metrics", metrics_page))
        return routes


def _route_name(request: web.Request) -> str:
    """A bounded label for metrics and logs: the route, never the raw path."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _http_error(request: web.Request, error: web.HTTPException, dialect: Dialect) -> ApplianceError:
    """aiohttp's own refusals (no route, wrong method, body over client_max_size) as our errors."""
    state = request.app[STATE]
    path = request.path[:200]
    if error.status == 404:
        if any(path.startswith(prefix) for prefix in dialect.prefixes):
            return dialect.not_found(request)
        owners = set(request.app[ROUTE_OWNERS].values())
        endpoints = sorted({path for served in owners for path in served.endpoints()})
        return NotFound(f"no endpoint at {path}; endpoints: {', '.join(endpoints)}")
    if error.status == 405:
        allowed = error.headers.get("Allow", "")
        return ApplianceError(f"method {request.method} is not allowed on {path}; use {allowed}", status=405,
                              headers={"Allow": allowed})
    if error.status == 413:
        state.metrics.rejected.labels("too_large").inc()
        limit = state.project.config.limits.body_bytes
        return ApplianceError(f"body exceeds max_body_bytes {limit}", status=413, headers=CLOSE)
    return ApplianceError(error.reason, status=error.status)


@web.middleware
async def serve_request(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    """The only middleware: request id, metrics and one log line per request with secrets redacted
    (RELIABILITY 15), and every failure, raised anywhere, rendered by the dialect of the route it happened on.

    One layer, not two (an access log around an error renderer): each middleware is one more coroutine per
    request, and aiohttp adds a layer of its own to any app that has middlewares."""
    state = request.app[STATE]
    dialect = dialect_of(request)
    request_id = request.headers.get("X-Request-Id", "")[:64] or f"{_REQUEST_PREFIX}-{next(_request_numbers):x}"
    request[REQUEST_ID] = request_id
    api = request[REQUEST_API] = dialect.name
    started = time.perf_counter()
    task = asyncio.current_task()
    assert task is not None
    state.handlers.add(task)
    try:
        response = await handler(request)
    except ClientGone as gone:
        state.metrics.client_disconnects.labels(gone.phase).inc()
        log.debug("client %s", gone.message)
        response = dialect.error_response(gone)
    except ApplianceError as error:
        if isinstance(error, Unauthorized):
            state.metrics.auth_failures.inc()
        if error.status in REJECTION_REASONS:  # 503s are counted where they are raised, with their reason
            state.metrics.rejected.labels(REJECTION_REASONS[error.status]).inc()
        response = dialect.error_response(error)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = dialect.error_response(_http_error(request, error, dialect))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error on %s", request.path[:200])
        response = dialect.error_response(ApplianceError("internal error; the appliance log has the details",
                                                         status=500))
    finally:
        state.handlers.discard(task)
    duration = time.perf_counter() - started
    endpoint = _route_name(request)
    status = response.status
    response.headers["X-Request-Id"] = request_id
    state.metrics.request(endpoint, status, api, duration)
    # One line per request at DEBUG; every refused or failed one at WARNING (RELIABILITY 15).
    level = logging.DEBUG if status < 400 else logging.WARNING
    if log.isEnabledFor(level):
        peer = request.transport.get_extra_info("peername") if request.transport else None
        log.log(level, "%s %s %s", request.method, request.path, status, extra={
            "request_id": request_id, "endpoint": endpoint, "api": api, "status": status,
            "method": request.method, "duration_ms": round(duration * 1000, 2), "peer": peer[0] if peer else None,
            "query": redact_query(request.rel_url.raw_query_string)[:500], "project": state.project.name})
    return response


async def health_live(request: web.Request) -> web.Response:
    return web.json_response({"status": "live"})


async def health_ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    project = state.project
    problem = core.readiness_problem(state)
    if problem is not None:
        raise ServiceUnavailable(problem)
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
    answer = {"status": status, "project": project.name, "nodes": project.node_count,
              "ready_nodes": project.ready_nodes, "in_flight": state.in_flight, "queued": state.waiting,
              "stuck_hooks": project.stuck_hooks, "models": models, "flow_sha256": project.flow_sha256}
    reloads = request.app[RELOADS]
    if reloads.done:
        answer["reloads"] = reloads.done
    if reloads.failed is not None:
        answer["reload_failed"] = reloads.failed  # the old flow serves (SIGHUP, server/reload.py)
    if reloads.restart_needed:
        answer["restart_needed"] = reloads.restart_needed
    if state.outputs:
        answer["outputs"] = {output.name: output.health() for output in state.outputs}
    if request.app[ACQUISITION].sources:
        answer["sources"] = {source.name: source.health() for source in request.app[ACQUISITION].sources}
    return web.json_response(answer)


async def metrics_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.project.config.metrics.loopback_only and not core.peer_is_loopback(request):
        raise Forbidden("metrics are served to this machine only (metrics.loopback_only in project.yaml)")
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def switch_model(request: web.Request) -> web.Response:
    """POST /models/switch?model=NAME&version=V: load V beside the running version, swap, keep the pointer."""
    state = request.app[STATE]
    query = params.parse_query(request.rel_url.raw_query_string)
    require_key(request, query, state.project.api_keys)
    name = params.text(query, "model")
    version = params.text(query, "version")
    previous = await switch_version(request.app, name, version)
    return web.json_response({"status": 200, "message": f"model {name}: {previous} -> {version}",
                              "data": {"model": name, "version": version, "previous": previous}})


async def enrol_face(request: web.Request) -> web.Response:
    """POST /faces/enrol?name=NAME with one image as the body, or several as multipart files: add the person's
    largest face of each image to the gallery of the project's identify@1 nodes (they use it at once)."""
    from appliance import frames
    from appliance.faces_gallery import enrol

    state = request.app[STATE]
    query = params.parse_query(request.rel_url.raw_query_string)
    require_key(request, query, state.project.api_keys)
    name = params.text(query, "name")
    limits = state.project.config.limits
    if media_type(request) == "multipart/form-data":
        _, files = await read_form(request, limits)
        bodies = list(files.values())
    else:
        bodies = [bytes(await read_body(request, limits))]
    if not bodies or not all(bodies):
        raise BadRequest("send the person's photos: one image as the body, or multipart files")
    color = state.project.config.color

    def work() -> int:
        images = [frames.decode_image(body, max_frame_pixels=limits.max_frame_pixels, color=color).image
                  for body in bodies]
        return enrol(state.project.files.directory, name, images)

    # Compiling the face models for enrolment takes a second: a thread of its own, never a frame worker.
    count = await asyncio.get_running_loop().run_in_executor(None, work)
    log.info("face gallery: %s enrolled from %d image(s)", name.strip(), len(bodies))
    return web.json_response({"status": 200, "message": f"{name.strip()}: {count} face descriptor(s) in the "
                              "gallery", "data": {"name": name.strip(), "descriptors": count}})


def pointer_poll_seconds() -> float:
    """How often the server reads the `current` pointers: 2 s (RELIABILITY 12.1); APPLIANCE_POINTER_POLL_S
    changes it (tests poll faster to catch a race)."""
    text = os.environ.get("APPLIANCE_POINTER_POLL_S", "")
    try:
        seconds = float(text) if text else DEFAULT_POINTER_POLL_S
    except ValueError:
        seconds = DEFAULT_POINTER_POLL_S
    if not 0 < seconds < 3600:
        log.warning("APPLIANCE_POINTER_POLL_S=%s is not a number of seconds in (0, 3600); polling every %g s",
                    text, DEFAULT_POINTER_POLL_S)
        seconds = DEFAULT_POINTER_POLL_S
    return seconds


async def _follow_model_pointers(app: web.Application) -> None:
    """Notice `current` pointers moved by `appliance models switch` (or a deployment tool) every 2 s."""
    state = app[STATE]
    reloads = app[RELOADS]
    loop = asyncio.get_running_loop()
    interval = pointer_poll_seconds()
    while True:
        await asyncio.sleep(interval)
        if state.ready and not state.draining:
            async with reloads.lock:
                runtime = state.project.runtime
                changed = await loop.run_in_executor(None, runtime.refresh)
                if changed:
                    state.metrics.describe_models(runtime)


def create_app(project: Project, *, stop_key: str | None = None, workers: int | None = None) -> web.Application:
    limits = project.config.limits
    slots = workers or max(1, os.cpu_count() or 1)
    # Long request lines: a `data` value up to max_data_bytes, fully percent-encoded, must fit (RELIABILITY 1.9).
    # keepalive: aiohttp's default keeps an idle connection for an hour (2.7).
    app = web.Application(middlewares=[serve_request], client_max_size=limits.body_bytes,
                          handler_args={"max_line_size": 65536, "max_field_size": 65536, "keepalive_timeout": 15})
    metrics = Metrics(project.name, project.flow_sha256)
    project.runtime.observer = metrics
    for runner in project.runners:
        runner.observe_node = metrics.node
    state = ServerState(project=project, stop_key=stop_key, metrics=metrics,
                        workers=Workers(slots, "worker"), slots=slots, queue_depth=queue_depth(project, slots))
    # The serving project's, whichever a reload put in place (server/reload.py).
    metrics.stuck_hooks.set_function(lambda: state.project.stuck_hooks)
    app[STATE] = state
    app[RELOADS] = Reloads()
    for name in project.config.apis:
        kind = DIALECTS[name]
        settings = kind.settings_model.model_validate(project.config.api_settings.get(name, {}))
        state.dialects[name] = kind(state, settings)
    if project.config.console.enabled:
        from appliance.console import Console  # the operator console at /console/, off unless enabled

        state.dialects["console"] = Console(state, project.config.console)
    owners: dict[web.AbstractResource, Dialect] = {}
    for served in [*state.dialects.values(), Core(state, Core.settings_model())]:
        before = set(app.router.resources())
        app.router.add_routes(served.routes())
        owners.update({resource: served for resource in app.router.resources() if resource not in before})
    app[ROUTE_OWNERS] = owners

    for index, settings in enumerate(project.files.outputs):
        state.outputs.append(OUTPUT_TYPES[settings.type](settings.name or f"{settings.type}-{index}", settings,
                                                         metrics))

    sources = [SOURCE_TYPES[settings.type](settings.name or f"{settings.type}-{index}", settings, metrics,
                                           project.files.directory)
               for index, settings in enumerate(project.files.sources)]
    acquisition = Acquisition(state, sources)
    app[ACQUISITION] = acquisition

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        for output in state.outputs:
            output.start()
        starting = asyncio.create_task(acquisition.run())
        for dialect in state.dialects.values():
            await dialect.start()
        follower = asyncio.create_task(_follow_model_pointers(app))
        yield
        follower.cancel()
        starting.cancel()
        await acquisition.stop()
        for dialect in state.dialects.values():
            await dialect.stop()
        await asyncio.gather(*(output.stop() for output in state.outputs))
        state.workers.shutdown()
        state.project.close()

    app.cleanup_ctx.append(lifecycle)
    return app
