"""KServe v2, the Open Inference Protocol over HTTP, as `tritonclient[http]` 2.73.0 speaks it (docs/apis.md, KServe).

Every model the project's flows use is served under its store name, taking its input as the appliance compiled
it: u8 BGR frames, NHWC, at the model's input size (what the flow's nodes give it). An inference runs on the
flow's own slot, so a hot swap (`/models/switch`, the `current` pointer) moves the flow and this API together;
`/versions/{v}` pins a version of the store, compiled beside the running one on first use. Inference goes through
the core's admission, queue and workers like a frame. Bodies are JSON tensors or the binary tensor extension
(`Inference-Header-Content-Length`); errors are `{"error": "..."}` with the HTTP status (400 bad tensor, 404
unknown model or version, 503 busy with Retry-After).
"""

from __future__ import annotations

import time

from aiohttp import web
from pydantic import BaseModel

from appliance import __version__
from appliance.errors import ApplianceError, ServiceUnavailable
from appliance.runtime.compiled import CompiledModel
from appliance.server import core
from appliance.server.auth import require_key
from appliance.server.body import read_body
from appliance.server.core import ServerState
from appliance.server.dialects.base import Dialect
from appliance.server.dialects.kserve import tensors
from appliance.server.dialects.kserve.models import ServedModels, served_slots, signature, store_versions
from appliance.server.render import Answer

PREFIX = "/v2"
MODEL = PREFIX + "/models/{model}"
VERSION = MODEL + "/versions/{version}"
# Server metadata's `extensions`: the binary tensor data extension is the one this API implements.
EXTENSIONS = ["binary_tensor_data"]


class KServe(Dialect):
    name = "kserve"
    prefixes = (PREFIX,)

    def __init__(self, state: ServerState, settings: BaseModel):
        super().__init__(state, settings)
        self.models = ServedModels()

    def routes(self) -> list[web.RouteDef]:
        infer = [web.post(path + "/infer", self.infer, expect_handler=core.expect_continue) for path in (MODEL, VERSION)]
        return [web.get(PREFIX, self.server_metadata), web.get(PREFIX + "/health/live", self.live),
                web.get(PREFIX + "/health/ready", self.ready), web.get(PREFIX + "/models", self.list_models),
                web.get(MODEL, self.model_metadata), web.get(VERSION, self.model_metadata),
                web.get(MODEL + "/ready", self.model_ready), web.get(VERSION + "/ready", self.model_ready), *infer]

    def render_error(self, error: ApplianceError) -> web.StreamResponse:
        return web.json_response({"error": error.message}, status=error.status, headers=error.headers)

    # --- server -----------------------------------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        problem = core.readiness_problem(self.state)
        if problem is not None:
            raise ServiceUnavailable(problem)
        return web.json_response({"ready": True})

    # --- models -----------------------------------------------------------------------------------------------

    async def _loaded(self, request: web.Request) -> CompiledModel:
        """The version a model path names (404 for an unknown model or version), after the API key."""
        state = self.state
        require_key(request, {}, state.project.api_keys)
        if not state.ready:
            raise ServiceUnavailable(core.readiness_problem(state) or "not ready", headers={"Retry-After": "1"})
        runtime = state.project.runtime
        name, version = request.match_info["model"], request.match_info.get("version")
        if version is None:
            return self.models.running(runtime, name)
        return await self.models.version(runtime, name, version)

    async def list_models(self, request: web.Request) -> web.Response:
        require_key(request, {}, self.state.project.api_keys)
        return web.json_response({"models": list(served_slots(self.state.project.runtime))})

    async def model_metadata(self, request: web.Request) -> web.Response:
        loaded = await self._loaded(request)
        store = self.state.project.runtime.store
        found = signature(loaded, store)
        name = request.match_info["model"]
        return web.json_response({"name": name, "versions": store_versions(store, name), "platform": found.platform,
                                  "inputs": [found.input.json()], "outputs": [spec.json() for spec in found.outputs]})

    async def model_ready(self, request: web.Request) -> web.Response:
        await self._loaded(request)
        problem = core.readiness_problem(self.state)
        if problem is not None:
            raise ServiceUnavailable(problem)
        return web.json_response({"name": request.match_info["model"], "ready": True})

    async def infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        state = self.state
        loaded = await self._loaded(request)
        core.admit(state)
        found = signature(loaded, state.project.runtime.store)
        body = await read_body(request, state.project.config.limits)
        received = time.perf_counter()
        header_size = tensors.header_length(request.headers.get(tensors.HEADER_LENGTH), len(body))
        name = request.match_info["model"]
        outputs = [spec.name for spec in found.outputs]
        stages = state.metrics.stages
        stages["receive"].observe(received - started)

        def work() -> Answer:
            decoding = time.perf_counter()
            parsed = tensors.parse_request(body, header_size, name, found.input, outputs)
            inferring = time.perf_counter()
            stages["decode"].observe(inferring - decoding)
            results = loaded.infer(parsed.batch)
            encoding = time.perf_counter()
            stages["flow"].observe(encoding - inferring)
            content, headers, content_type = tensors.render_response(name, loaded.version, parsed, results)
            stages["encode"].observe(time.perf_counter() - encoding)
            return Answer(content, content_type, headers)

        return core.response(await core.in_worker(request, state, work))
