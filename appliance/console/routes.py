"""The console's routes under /console/: the page and its static files, and the JSON API the page calls (live
frames as server-sent events, inspection of one image, teaching, model versions and switches, the gallery).

Every API call passes the Guard (security.py) first; every call that changes something carries the session's
CSRF token and is logged with the session's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance import __version__, frames
from appliance.config.project import ConsoleSettings
from appliance.console import views
from appliance.console.background import Background
from appliance.console.gallery import Gallery
from appliance.console.live import LiveView
from appliance.console.security import Guard, Session, is_loopback_host
from appliance.console.stats import SAMPLE_S, LineStats
from appliance.console.teach import MODES as TEACH_MODES
from appliance.console.teach import SETS, TEACH_MODE, Teaching, save_version
from appliance.context import to_json
from appliance.errors import ApplianceError, BadRequest, NotFound
from appliance.runtime.store import StoreError, read_current
from appliance.server import core
from appliance.server.body import read_body
from appliance.server.core import ServerState
from appliance.server.dialects.base import Dialect
from appliance.server.reload import switch_version
from appliance.server.render import Answer

log = logging.getLogger("appliance.console")

STATIC = Path(__file__).resolve().parent / "static"
_STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(css|js|svg|png|html)$")
_CONTENT_TYPES = {"css": "text/css", "js": "text/javascript", "svg": "image/svg+xml", "png": "image/png",
                  "html": "text/html"}
# The page loads nothing from elsewhere and runs no inline script: a page of another origin cannot frame it, and
# an injected string cannot run.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# The live stream sends the line's numbers this often, with or without frames (and so notices a closed page).
STATS_EVERY_S = 1.0
INSPECT_SIDE = 1280
MAX_COLLECT = 200


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number, got {value!r:.40}")
    return float(value)


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} is missing; send it as a JSON string")
    return value


class Console(Dialect):
    """The operator console, served with the project's APIs on its port (project.yaml `console:`)."""

    name = "console"
    prefixes = ("/console",)

    def __init__(self, state: ServerState, settings: ConsoleSettings):  # type: ignore[override]
        super().__init__(state, settings)
        self.settings: ConsoleSettings = settings
        project = state.project
        folder = Path(settings.folder)
        self.folder = folder if folder.is_absolute() else project.files.directory / folder
        self.guard = Guard(settings, project.name, not is_loopback_host(project.config.host), project.api_keys)
        self.background = Background("console-disk")
        self.live = LiveView(settings.live_fps)
        self.gallery = Gallery(self.folder / "gallery", settings.gallery, self.background)
        self.teaching = Teaching(self.folder / "teach", self.background)
        self.stats = LineStats(state.metrics)
        # model -> the version that served before the console's last switch of it (the "roll back" button).
        self.previous: dict[str, str] = {}
        self._sampler: asyncio.Task | None = None

    # -- wiring --------------------------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        api = "/console/api"
        return [
            web.get("/console", self.redirect), web.get("/console/", self.page),
            web.get("/console/static/{name}", self.static),
            web.get(f"{api}/session", self.session_info), web.post(f"{api}/login", self.login),
            web.post(f"{api}/logout", self.logout),
            web.get(f"{api}/overview", self.overview), web.get(f"{api}/stats", self.line_stats),
            web.get(f"{api}/live", self.live_stream),
            web.post(f"{api}/inspect", self.inspect, expect_handler=core.expect_continue),
            web.get(f"{api}/models", self.models), web.post(f"{api}/models/switch", self.switch),
            web.get(f"{api}/gallery", self.gallery_listing),
            web.get(f"{api}/gallery/{{entry}}/{{kind}}", self.gallery_file),
            web.post(f"{api}/gallery/zip", self.gallery_zip),
            web.get(f"{api}/teach", self.teach_state),
            web.post(f"{api}/teach/images", self.teach_add, expect_handler=core.expect_continue),
            web.post(f"{api}/teach/remove", self.teach_remove),
            web.get(f"{api}/teach/thumbnail", self.teach_thumbnail),
            web.post(f"{api}/teach/collect", self.teach_collect),
            web.post(f"{api}/teach/collect/stop", self.teach_collect_stop),
            web.post(f"{api}/teach/train", self.teach_train), web.post(f"{api}/teach/cancel", self.teach_cancel),
            web.post(f"{api}/teach/save", self.teach_save),
        ]

    async def start(self) -> None:
        self.live.start(asyncio.get_running_loop())
        self.background.start()
        self.background.offer(self.gallery.load)
        self.state.observers.extend([self.live.observe, self.gallery.observe, self.teaching.observe])
        self._sampler = asyncio.create_task(self._sample())
        log.info("console served at /console/ (%s)", "this machine and, with the key, others" if self.settings.remote
                 else "this machine only")

    async def stop(self) -> None:
        for observer in (self.live.observe, self.gallery.observe, self.teaching.observe):
            with contextlib.suppress(ValueError):
                self.state.observers.remove(observer)
        if self._sampler is not None:
            self._sampler.cancel()
        self.teaching.cancel()
        self.live.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.background.stop)

    async def _sample(self) -> None:
        while True:
            self.stats.sample()
            await asyncio.sleep(SAMPLE_S)

    def action(self, session: Session, text: str) -> None:
        """Every change made through the console, with the session that made it."""
        log.info("console session %s: %s", session.id, text)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        body = await read_body(request, self.state.project.config.limits)
        try:
            found = json.loads(bytes(body) or b"{}")
        except ValueError as error:
            raise BadRequest(f"body must be JSON: {error}") from None
        if not isinstance(found, dict):
            raise BadRequest("body must be a JSON object")
        return found

    # -- the page ------------------------------------------------------------------------------------------------

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/console/")

    async def page(self, request: web.Request) -> web.Response:
        session, opened = self.guard.page_session(request)
        response = web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html",
                                charset="utf-8", headers=PAGE_HEADERS)
        if session is not None and opened:
            self.guard.set_cookie(response, session)
        return response

    async def static(self, request: web.Request) -> web.Response:
        self.guard.admit_peer(request)
        name = request.match_info["name"]
        path = STATIC / name
        if not _STATIC_NAME.match(name) or not path.is_file():
            raise NotFound(f"no console file {name[:100]}")
        return web.Response(body=path.read_bytes(), content_type=_CONTENT_TYPES[name.rsplit(".", 1)[1]],
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    # -- sessions ------------------------------------------------------------------------------------------------

    def _session_answer(self, request: web.Request, session: Session) -> dict[str, Any]:
        project = self.state.project
        return {"session": session.id, "csrf": session.csrf, "project": project.name, "version": __version__,
                "logged_in_with_key": session.key_name is not None,
                "login_required": self.guard.login_needed(request), "live_fps": self.settings.live_fps}

    async def session_info(self, request: web.Request) -> web.StreamResponse:
        session, opened = self.guard.page_session(request)
        if session is None:
            return self.error_response(ApplianceError("log in to the console with the project's key", status=401))
        response = web.json_response(self._session_answer(request, session))
        if opened:
            self.guard.set_cookie(response, session)
        return response

    async def login(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        key = body.get("key")
        if not isinstance(key, str) or not key:
            raise BadRequest("key is missing; send the project's key as a JSON string")
        session = self.guard.login(request, key)
        response = web.json_response(self._session_answer(request, session))
        self.guard.set_cookie(response, session)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        self.guard.logout(session)
        response = web.json_response({"status": 200, "message": "logged out", "data": None})
        response.del_cookie(self.guard.cookie, path="/console/")
        return response

    # -- live ----------------------------------------------------------------------------------------------------

    def _stats(self) -> dict[str, Any]:
        answer = self.stats.snapshot(self.state.queue_depth)
        answer["live_pushed"] = self.live.pushed
        answer["gallery_dropped"] = self.gallery.dropped
        answer["ready"] = self.state.ready and not self.state.draining
        return answer

    async def line_stats(self, request: web.Request) -> web.Response:
        self.guard.require(request, changes_state=False)
        return web.json_response(self._stats())

    async def overview(self, request: web.Request) -> web.Response:
        self.guard.require(request, changes_state=False)
        project = self.state.project
        return web.json_response({"project": project.name, "flow": views.flow_graph(project.graph),
                                  "flow_sha256": project.flow_sha256, "stats": self._stats()})

    async def live_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `frame` (at most live_fps a second, the newest) and `stats` (every second)."""
        session = self.guard.require(request, changes_state=False)
        state = self.state
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        page = self.live.subscribe(state.last)
        log.debug("console session %s: live view open", session.id)
        try:
            await response.write(b"retry: 2000\n\n")
            last_stats = 0.0
            while not state.draining and not state.stop_requested.is_set():
                try:
                    await response.write(await asyncio.wait_for(page.get(), timeout=STATS_EVERY_S))
                except TimeoutError:
                    pass
                if time.monotonic() - last_stats >= STATS_EVERY_S:
                    last_stats = time.monotonic()
                    await response.write(b"event: stats\ndata: " + json.dumps(self._stats()).encode() + b"\n\n")
        except (ConnectionResetError, ConnectionError):
            pass  # the page was closed
        finally:
            self.live.unsubscribe(page)
            log.debug("console session %s: live view closed", session.id)
        return response

    # -- inspect -------------------------------------------------------------------------------------------------

    async def inspect(self, request: web.Request) -> web.Response:
        """An image (the body, or ?gallery=ID) through the project's flow: the answer with both pictures. It
        queues with the line's frames, and reaches neither the outputs, the counters nor the gallery."""
        session = self.guard.require(request, changes_state=True)
        state = self.state
        limits = state.project.config.limits
        entry_id = request.query.get("gallery")
        loop = asyncio.get_running_loop()
        if entry_id:
            entry = self.gallery.entry(entry_id)
            if entry is None:
                raise NotFound(f"no gallery frame {entry_id[:40]}")
            body: bytes | bytearray = await loop.run_in_executor(None, (self.gallery.folder / entry.frame).read_bytes)
            what = f"gallery frame {entry_id}"
        else:
            body = await read_body(request, limits)
            what = f"image {request.query.get('name', '')[:80]!r} ({len(body)} bytes)"
        if not body:
            raise BadRequest("send an image as the body (JPEG, PNG, BMP, TIFF or WebP), or ?gallery=ID")
        project, color = state.project, state.project.config.color

        def work() -> Answer:
            frame = frames.decode_image(body, max_frame_pixels=limits.max_frame_pixels, color=color)
            ctx = project.inspect(frame, "")
            result = views.summary(ctx)
            result["image"] = views.jpeg_data_url(views.preview(ctx, heat=False, side=INSPECT_SIDE))
            if ctx.get("heatmaps"):
                result["overlay"] = views.jpeg_data_url(views.preview(ctx, heat=True, side=INSPECT_SIDE))
                result["heatmap"] = views.jpeg_data_url(views.heatmap_preview(ctx, side=INSPECT_SIDE))
            result["context"] = json.loads(to_json(ctx))
            return Answer(json.dumps(result).encode(), "application/json")

        answer = await core.in_worker(request, state, work)
        self.action(session, f"inspected {what}")
        return core.response(answer)

    # -- models --------------------------------------------------------------------------------------------------

    def _models(self) -> list[dict[str, Any]]:
        runtime = self.state.project.runtime
        found: dict[str, dict[str, Any]] = {}
        for slot in runtime.slots.values():
            if slot.name in found or not slot.follows_pointer:
                continue
            versions = views.model_versions(runtime.store / slot.name)
            names = [v["version"] for v in versions]
            serving = slot.current.version if slot.current else None
            # Back to what served before the console's last switch, else to the version before the serving one.
            back = self.previous.get(slot.name)
            if back is None or back == serving or back not in names:
                older = names[:names.index(serving)] if serving in names else []
                back = older[-1] if older else None
            found[slot.name] = {"model": slot.name, "serving": serving,
                                "pointer": read_current(runtime.store / slot.name), "device": slot.options.device,
                                "failed_version": slot.failed_version, "roll_back_to": back, "versions": versions}
        return list(found.values())

    async def models(self, request: web.Request) -> web.Response:
        self.guard.require(request, changes_state=False)
        return web.json_response({"models": self._models()})

    async def _switch(self, request: web.Request, model: str, version: str) -> str | None:
        """Compile ``version`` beside the running one and swap (the hot swap of POST /models/switch)."""
        previous = await switch_version(request.app, model, version)
        if previous is not None and previous != version:
            self.previous[model] = previous
        return previous

    async def switch(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        body = await self._json(request)
        model, version = _text(body, "model"), _text(body, "version")
        previous = await self._switch(request, model, version)
        self.action(session, f"model {model}: {previous} -> {version}")
        return web.json_response({"status": 200, "message": f"model {model}: {previous} -> {version}",
                                  "data": {"model": model, "version": version, "previous": previous}})

    # -- gallery -------------------------------------------------------------------------------------------------

    async def gallery_listing(self, request: web.Request) -> web.Response:
        self.guard.require(request, changes_state=False)
        query = request.query

        def moment(name: str) -> float | None:
            text = query.get(name, "")
            if not text:
                return None
            try:
                return float(text)
            except ValueError:
                raise BadRequest(f"{name} must be seconds since 1970 (a number), got {text[:40]!r}") from None

        try:
            limit = max(1, min(500, int(query.get("limit", "60"))))
        except ValueError:
            raise BadRequest("limit must be a whole number") from None
        verdict = query.get("verdict") or None
        if verdict not in (None, "ok", "ng"):
            raise BadRequest("verdict must be ok or ng")
        return web.json_response(self.gallery.listing(node=query.get("node") or None, verdict=verdict,
                                                      since=moment("since"), until=moment("until"), limit=limit,
                                                      before=query.get("before") or None))

    async def gallery_file(self, request: web.Request) -> web.StreamResponse:
        self.guard.require(request, changes_state=False)
        entry = self.gallery.entry(request.match_info["entry"])
        kind = request.match_info["kind"]
        if entry is None or kind not in ("preview", "frame"):
            raise NotFound("no such gallery file")
        name = f"{entry.id}.preview.jpg" if kind == "preview" else entry.frame
        path = self.gallery.folder / name
        if not path.is_file():
            raise NotFound("no such gallery file (removed past the gallery's bounds)")
        headers = {"Cache-Control": "private, max-age=86400"}
        if kind == "frame":
            headers["Content-Disposition"] = f'inline; filename="{entry.frame}"'
        return web.FileResponse(path, headers=headers)

    async def gallery_zip(self, request: web.Request) -> web.StreamResponse:
        session = self.guard.require(request, changes_state=True)
        body = await self._json(request)
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise BadRequest("ids must be a non-empty list of gallery frame ids")
        loop = asyncio.get_running_loop()
        with tempfile.TemporaryFile(dir=self.folder if self.folder.is_dir() else None) as archive:
            count = await loop.run_in_executor(None, self.gallery.write_zip, ids[:5000], archive)
            size = archive.tell()
            archive.seek(0)
            name = f"{self.state.project.name}-gallery-{time.strftime('%Y%m%d-%H%M%S')}.zip"
            response = web.StreamResponse(headers={"Content-Type": "application/zip", "Content-Length": str(size),
                                                   "Content-Disposition": f'attachment; filename="{name}"'})
            await response.prepare(request)
            while chunk := await loop.run_in_executor(None, archive.read, 1 << 20):
                await response.write(chunk)
        self.action(session, f"downloaded {count} gallery frame(s) as a zip")
        await response.write_eof()
        return response

    # -- teach ---------------------------------------------------------------------------------------------------

    def _anomaly_models(self) -> list[dict[str, Any]]:
        """The models of the flow's anomaly@1 nodes: what teaching can replace, with their input size."""
        project = self.state.project
        found: dict[str, dict[str, Any]] = {}
        for node_id, node in project.graph.nodes.items():
            model = getattr(node.settings, "model", None)
            if node.settings.type != "anomaly@1" or not isinstance(model, str) or model in found:
                continue
            size = 256
            current = read_current(project.runtime.store / model)
            if current is not None:
                versions = {v["version"]: v for v in views.model_versions(project.runtime.store / model)}
                size = int(versions.get(current, {}).get("size") or size)
            found[model] = {"model": model, "node": node_id, "current": current, "size": size}
        return list(found.values())

    async def teach_state(self, request: web.Request) -> web.Response:
        self.guard.require(request, changes_state=False)
        answer = self.teaching.snapshot()
        answer["models"] = self._anomaly_models()
        return web.json_response(answer)

    async def teach_add(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        kind, name = request.query.get("set", "good"), request.query.get("name", "image")
        limits = self.state.project.config.limits
        body = await read_body(request, limits)
        if not body:
            raise BadRequest("send one image as the body")
        color = self.state.project.config.color

        def store() -> str:
            frame = frames.decode_image(body, max_frame_pixels=limits.max_frame_pixels, color=color)
            return self.teaching.add(kind, name, frame.image)

        stored = await asyncio.get_running_loop().run_in_executor(None, store)
        self.action(session, f"teach: added {kind} image {stored}")
        return web.json_response({"status": 200, "message": f"added {stored}", "data": {"set": kind, "name": stored}})

    async def teach_remove(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        body = await self._json(request)
        kind, name = _text(body, "set"), body.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest("name must be a string, or null for the whole set")
        removed = await asyncio.get_running_loop().run_in_executor(None, self.teaching.remove, kind, name)
        self.action(session, f"teach: removed {removed} {kind} image(s)")
        return web.json_response({"status": 200, "message": f"removed {removed}", "data": {"removed": removed}})

    async def teach_thumbnail(self, request: web.Request) -> web.Response:
        self.guard.require(request, changes_state=False)
        kind, name = request.query.get("set", ""), request.query.get("name", "")
        body = await asyncio.get_running_loop().run_in_executor(None, self.teaching.thumbnail, kind, name)
        return web.Response(body=body, content_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    async def teach_collect(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        body = await self._json(request)
        kind = body.get("set", "good")
        count = body.get("count")
        if kind not in SETS:
            raise BadRequest(f"set must be one of {', '.join(SETS)}")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COLLECT:
            raise BadRequest(f"count must be a whole number from 1 to {MAX_COLLECT}")
        self.teaching.collect(kind, count)
        self.action(session, f"teach: collecting the next {count} frames of the line as {kind}")
        return web.json_response({"status": 200, "message": f"collecting {count} frames", "data": None})

    async def teach_collect_stop(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        self.teaching.stop_collecting()
        self.action(session, "teach: collection stopped")
        return web.json_response({"status": 200, "message": "stopped", "data": None})

    async def teach_train(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        body = await self._json(request)
        mode = body.get("mode", TEACH_MODE)
        if not isinstance(mode, str) or mode not in TEACH_MODES:
            raise BadRequest(f"mode must be one of {', '.join(TEACH_MODES)}, got {json.dumps(mode)[:40]}")
        models = {entry["model"]: entry for entry in self._anomaly_models()}
        if not models:
            raise BadRequest("this project's flow has no anomaly@1 node to teach")
        model = body.get("model") or next(iter(models))
        if model not in models:
            raise BadRequest(f"model '{str(model)[:80]}' is not an anomaly model of this flow; models: "
                             f"{', '.join(models)}")
        await self.teaching.train(model, models[model]["size"], mode)
        self.action(session, f"teach: training {model} ({mode}) on {len(self.teaching.images('good'))} good and "
                             f"{len(self.teaching.images('bad'))} bad image(s)")
        return web.json_response({"status": 200, "message": "training", "data": None})

    async def teach_cancel(self, request: web.Request) -> web.Response:
        session = self.guard.require(request, changes_state=True)
        if self.teaching.cancel():
            self.action(session, "teach: training cancelled")
        return web.json_response({"status": 200, "message": "cancelled", "data": None})

    async def teach_save(self, request: web.Request) -> web.Response:
        """Save the trained draft as the next version with the chosen threshold, and serve it at once."""
        session = self.guard.require(request, changes_state=True)
        body = await self._json(request)
        teaching = self.teaching
        if teaching.status != "trained" or teaching.result is None or teaching.model is None:
            raise ApplianceError("nothing trained to save: train first", status=409)
        threshold = _number(body.get("threshold", teaching.result["threshold"]), "threshold")
        if threshold <= 0:
            raise BadRequest(f"threshold must be above 0, got {threshold:g}")
        model, result = teaching.model, teaching.result
        runtime = self.state.project.runtime
        model_dir = runtime.store / model
        loop = asyncio.get_running_loop()
        try:
            version = await loop.run_in_executor(None, save_version, teaching.folder, result, model_dir, threshold,
                                                 session.id)
        except StoreError as error:
            raise BadRequest(str(error)) from None
        # The version is in the store but not current: the hot swap compiles it beside the serving one, then
        # points `current` at it and swaps; if it does not load, the old version keeps serving.
        try:
            previous = await self._switch(request, model, version)
        except BadRequest as error:
            raise BadRequest(f"version {version} was saved but does not load: {error.message}") from None
        teaching.status = "saved"
        teaching.saved = {"model": model, "version": version, "previous": previous, "threshold": threshold}
        self.action(session, f"teach: saved {model} version {version} (threshold {threshold:.4g}) and switched "
                             f"{previous} -> {version}")
        return web.json_response({"status": 200, "message": f"model {model}: version {version} serves",
                                  "data": teaching.saved})


def console_url(host: str, port: int) -> str:
    """Where a browser on this machine opens the console."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/console/"

