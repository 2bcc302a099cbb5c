"""PEKAT VISION's REST API, exactly as `pekat-vision-sdk` 2.3.3 uses it (docs/apis.md, PEKAT).

The flow's context is PEKAT's own answer: this dialect renders it as JSON, or as an image with the context in
a header or in the body. Errors are `{"status": N, "message": "...", "data": null}` with the same HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from aiohttp import web

from appliance import __version__, frames
from appliance.errors import BadRequest, Forbidden, NotFound, Unauthorized
from appliance.server import core
from appliance.server.auth import require_key
from appliance.server.body import check_declared_size, media_type, read_body, read_multipart_file
from appliance.server.core import STATE, ServerState
from appliance.server.dialects.base import Dialect
from appliance.server.dialects.pekat import params
from appliance.server.dialects.pekat.answer import build_answer
from appliance.server.inspection import Inspection
from appliance.server.render import Answer

# The PEKAT version whose API we speak; our own version rides in the PEP 440 local label, which the 2.3.3
# client's packaging.version still reads as >= 3.18.0 (so it uses shared memory).
PEKAT_VERSION = f"3.18.0+appliance.{__version__}"


def _begin(request: web.Request) -> tuple[ServerState, dict[str, bytes], params.AnalyzeParams]:
    state = request.app[STATE]
    query = params.parse_query(request.rel_url.raw_query_string)
    require_key(request, query, state.project.api_keys)
    # The flow's override ranges are gathered from its nodes: only for a request that sets one.
    ranges = state.project.override_ranges if any(name in query for name in params.OVERRIDES) else None
    analyze = params.analyze_params(query, max_data_bytes=state.project.config.limits.max_data_bytes,
                                    ranges=ranges)
    return state, query, analyze


def _renderer(state: ServerState, query: params.AnalyzeParams):  # type: ignore[no-untyped-def]
    settings = state.project.config.image_response

    def render(inspection: Inspection) -> Answer:
        return build_answer(inspection.context, query.response_type, context_in_body=query.context_in_body,
                            image_format=query.image_format or settings.format,
                            jpeg_quality=query.jpeg_quality or settings.jpeg_quality)

    return render


async def _inspect(request: web.Request, state: ServerState, query: params.AnalyzeParams, decode, started: float,
                   received: float | None = None) -> web.Response:  # type: ignore[no-untyped-def]
    answer = await core.inspect(request, state, decode, _renderer(state, query), data=query.data,
                                options=query.request, started=started, received=received)
    return core.response(answer)


def _frame_size(query: dict[str, bytes], state: ServerState) -> tuple[int, int]:
    width, height = params.dimension(query, "width"), params.dimension(query, "height")
    core.frame_size_allowed(state, width, height)
    return width, height


async def analyze_image(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, _, query = _begin(request)
    core.admit(state)
    limits = state.project.config.limits
    body: bytes | bytearray
    if media_type(request) == "multipart/form-data":
        body = await read_multipart_file(request, limits)
    else:
        body = await read_body(request, limits)
    color = state.project.config.color

    def decode() -> frames.Frame:
        return frames.decode_image(body, max_frame_pixels=limits.max_frame_pixels, color=color)

    return await _inspect(request, state, query, decode, started, time.perf_counter())


async def analyze_raw_image(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, raw_query, query = _begin(request)
    width, height = _frame_size(raw_query, state)
    bayer = params.flag(raw_query, "bayer")
    core.admit(state)
    body = await read_body(request, state.project.config.limits)
    color = state.project.config.color

    def decode() -> frames.Frame:
        return frames.raw_frame(body, width, height, bayer=bayer, color=color)

    return await _inspect(request, state, query, decode, started, time.perf_counter())


async def analyze_shared_memory(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, raw_query, query = _begin(request)
    if not core.peer_is_loopback(request):
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

    response = await _inspect(request, state, query, decode, started)
    if request.can_read_body:
        response.force_close()
    return response


async def last_image(request: web.Request) -> web.Response:
    """GET /last_image: the last analysed frame's answer again, in any response type (PROTOCOL.md 1)."""
    state, _, query = _begin(request)
    ctx = state.last
    if ctx is None:
        raise NotFound("no frame has been analysed yet")
    render = _renderer(state, query)
    answer = await state.workers.run(lambda: render(Inspection(ctx)))
    return core.response(answer)


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def version(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STATE].project.config.version_reply or PEKAT_VERSION)


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


class Pekat(Dialect):
    name = "pekat"

    def routes(self) -> list[web.RouteDef]:
        analyze = [web.post(path, handler, expect_handler=core.expect_continue)
                   for path, handler in (("/analyze_image", analyze_image), ("/analyze_raw_image", analyze_raw_image),
                                         ("/analyze_image_shared_memory", analyze_shared_memory))]
        return [*analyze, web.get("/last_image", last_image), web.get("/ping", ping),
                web.get("/version", version), web.get("/stop", stop)]
