"""RAYPACK's API (docs/apis.md, RAYPACK): POST /recog (general objects, food, celebrities, demographics),
POST /getmodels and POST /raypackfacev3 (Face AI with anonymisation), each a form with the `apikey` field.

Each RAYPACK model is a capability of the project (objects, food, identities, faces, demographics); a model whose
capability has no flow is "not installed" (404). Image URLs are fetched only from the hosts of the setting
`url_hosts` (a line has no internet). Errors: `{"error": {"code": N, "message": "..."}}` with HTTP status N.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web
from yarl import URL

from appliance import frames
from appliance.config.apis import RaypackSettings
from appliance.errors import ApplianceError, BadRequest, NotFound, Unauthorized, UnsupportedMediaType
from appliance.server import core
from appliance.server.auth import key_name
from appliance.server.body import media_type, read_form
from appliance.server.core import STATE, ServerState
from appliance.server.dialects.base import Dialect
from appliance.server.dialects.raypack import tags
from appliance.server.dialects.raypack.face import FACEMODES, MODES, face_answer
from appliance.server.image_urls import fetch_image
from appliance.server.inspection import Inspection
from appliance.server.render import Answer


@dataclass(frozen=True)
class RaypackModel:
    id: str
    name: str
    capability: str
    modelname: str
    desc: str
    parameters: str
    tags: Callable[[Inspection, float, str], list[dict[str, str]]] | None = None


_RECOG_PARAMETERS = ("model=Defines the modelID,lang=defines the language (de or en),threshold=minimum value of "
                     "a returned tag (default 0.9),file=the image (upload) or url=its address")
MODELS = (
    RaypackModel("1", "general", "objects", "Raypack_General", "General objects: the labels of the project's "
                 "objects flow (by default the 1000 ImageNet classes)", _RECOG_PARAMETERS, tags.objects),
    RaypackModel("2", "food", "food", "Raypack_Food", "Food and drink: ImageNet's 46 food classes with parent "
                 "tags such as pasta, fruit, coffee, drink", _RECOG_PARAMETERS, tags.food),
    RaypackModel("3", "celeb_us", "identities", "Raypack_Celeb_US", "Recognition of the people enrolled on this "
                 "appliance", _RECOG_PARAMETERS, tags.identities),
    RaypackModel("4", "raypackfacev3", "faces", "Raypack_Face_V3", "Face detection and anonymisation: POST "
                 "/raypackfacev3", "imagef=the image (upload) or its address,threshold=minimum face score (default "
                 "0.9),mode=image|json|jsonimage,facemode=default|pixel|fill|black,hex=box and fill colour rrggbb"),
    RaypackModel("5", "demographics", "demographics", "Raypack_Demographics", "Gender and age of every face",
                 _RECOG_PARAMETERS, tags.demographics),
)
RECOG_MODELS = {model.id: model for model in MODELS if model.tags is not None}
MISSING_KEY = ("missing API key: send the form field apikey, e.g. curl -F \"apikey=<key>\" (the form "
               "-F \"apikey: <key>\" is not valid curl syntax: curl refuses it and sends nothing)")


@dataclass
class Form:
    fields: dict[str, str]
    files: dict[str, bytes]
    filenames: dict[str, str] = field(default_factory=dict)


def _installed(state: ServerState, model: RaypackModel) -> bool:
    return state.project.capability_problem(model.capability) is None


def _installed_list(state: ServerState) -> str:
    found = [f"{model.id} ({model.name})" for model in MODELS if _installed(state, model)]
    return ", ".join(found) or "none"


async def _read_form(request: web.Request, state: ServerState) -> Form:
    form = Form({}, {})
    if request.body_exists and media_type(request) not in ("multipart/form-data",
                                                            "application/x-www-form-urlencoded"):
        raise UnsupportedMediaType(f"body of type {media_type(request)[:100]} is not a form; send "
                                   "multipart/form-data (curl -F) or application/x-www-form-urlencoded (curl -d)")
    if request.body_exists:
        form.fields, form.files = await read_form(request, state.project.config.limits, form.filenames)
    return form


def _require_key(request: web.Request, form: Form, state: ServerState) -> None:
    """The `apikey` form field (an `apikey` header is also taken: the document calls the key a header once)."""
    keys = state.project.api_keys
    if not keys:
        return
    candidates = []
    if "apikey" in form.fields:
        candidates.append(form.fields["apikey"].encode("utf-8"))
    elif "apikey" in form.files:
        candidates.append(form.files["apikey"])
    header = request.headers.get("apikey")
    if header is not None:
        candidates.append(header.encode("utf-8", "surrogateescape"))
    if not candidates:
        raise Unauthorized(MISSING_KEY)
    names = [key_name(candidate, keys) for candidate in candidates]
    if names[0] is None or any(name != names[0] for name in names):
        raise Unauthorized("wrong API key")


def _threshold(form: Form) -> float:
    text = form.fields.get("threshold", "").strip()
    if not text:
        return 0.9
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"threshold must be a number from 0 to 1, got {text[:40]!r}") from None
    if not 0 <= value <= 1:  # also refuses nan
        raise BadRequest(f"threshold must be from 0 to 1, got {text[:40]}")
    return value


def _choice(form: Form, name: str, allowed: tuple[str, ...], default: str) -> str:
    text = form.fields.get(name, "").strip().lower() or default
    if text not in allowed:
        raise BadRequest(f"{name} must be {' or '.join(allowed)}, got {text[:40]!r}")
    return text


def _colour(form: Form) -> str:
    text = form.fields.get("hex", "").strip().removeprefix("#").lower() or "00ff00"
    if len(text) != 6 or any(c not in "0123456789abcdef" for c in text):
        raise BadRequest(f"hex must be a colour as 6 hexadecimal digits rrggbb (e.g. 00ff00), got {text[:40]!r}")
    return text


def _error_detail(inspection: Inspection) -> None:
    if inspection.errors:
        first = inspection.errors[0]
        raise ApplianceError(f"the image could not be analysed: {first.get('node', '')}: "
                             f"{str(first.get('message', ''))[:300]}", status=422)


def _json(document: dict[str, Any]) -> Answer:
    return Answer(json.dumps(document, ensure_ascii=False).encode("utf-8"), "application/json")


class Raypack(Dialect):
    name = "raypack"
    settings_model = RaypackSettings
    prefixes = ("/recog", "/getmodels", "/raypackfacev3")
    settings: RaypackSettings

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/recog", recog, expect_handler=core.expect_continue),
                web.post("/raypackfacev3", raypackfacev3, expect_handler=core.expect_continue),
                web.post("/getmodels", getmodels)]

    def render_error(self, error: ApplianceError) -> web.StreamResponse:
        body = json.dumps({"error": {"code": error.status, "message": error.message}}).encode("utf-8")
        return web.Response(body=body, status=error.status, content_type="application/json",
                            headers=error.headers)

    async def image(self, form: Form, name: str, url_name: str | None) -> tuple[bytes, str]:
        """The image bytes and the `originalfile` (the upload's filename or the URL) from field ``name`` (an
        upload, or a URL as text) or ``url_name`` (a URL)."""
        if name in form.files:
            body = form.files[name]
            if not body:
                raise BadRequest(f"the uploaded {name} is empty")
            return body, form.filenames.get(name, name)[:255]
        url = form.fields.get(name, "").strip() or (form.fields.get(url_name, "").strip() if url_name else "")
        if not url:
            where = f"-F {name}=@image.jpg" + (f" or -F {url_name}=http://..." if url_name else "")
            if url_name and url_name in form.files:
                raise BadRequest(f"{url_name} must be an address (text), not a file; send {where}")
            raise BadRequest(f"missing image: send {where}")
        if not url.lower().startswith(("http://", "https://")):
            raise BadRequest(f"{name} is text but not an http(s) URL: upload the file with -F {name}=@path")
        return await self.fetch(url), url[:2000]

    async def fetch(self, text: str) -> bytes:
        """GET an image URL of an allowed host, within the timeout and the body limit, redirects not followed."""
        try:
            url = URL(text)
            host, port = (url.host or "").lower(), url.port
        except ValueError:
            raise BadRequest("the image URL could not be parsed") from None
        allowed = {entry.lower() for entry in self.settings.url_hosts}
        if not host or (host not in allowed and f"{host}:{port}" not in allowed):
            raise BadRequest(f"image URLs are not fetched from {host or 'this address'}: the appliance has no "
                             "internet access; upload the image (-F file=@image.jpg), or add the host to "
                             "api_settings.raypack.url_hosts")
        return await fetch_image(text, timeout_s=self.settings.url_timeout_s,
                                 limit=self.state.project.config.limits.body_bytes)


def _begin(request: web.Request) -> tuple[ServerState, Raypack]:
    state = request.app[STATE]
    dialect = state.dialects["raypack"]
    assert isinstance(dialect, Raypack)
    return state, dialect


class _Clock:
    """The frame as decoded and when the model started on it (both set in the worker thread)."""

    def __init__(self, state: ServerState, body: bytes):
        self.state, self.body = state, body
        self.started_at = 0.0
        self.image: np.ndarray | None = None

    def decode(self) -> frames.Frame:
        self.started_at = time.time()
        config = self.state.project.config
        frame = frames.decode_image(self.body, max_frame_pixels=config.limits.max_frame_pixels, color=config.color)
        self.image = frame.image
        return frame


async def recog(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, dialect = _begin(request)
    core.admit(state)
    form = await _read_form(request, state)
    _require_key(request, form, state)
    model_id = form.fields.get("model", "").strip()
    choices = "1 (general objects), 2 (food), 3 (celebrities) or 5 (demographics)"
    if not model_id:
        raise BadRequest(f"missing field model: {choices}")
    if model_id == "4":
        raise BadRequest("model 4 is Face AI: POST /raypackfacev3 with the field imagef")
    model = RECOG_MODELS.get(model_id)
    if model is None:
        raise BadRequest(f"unknown model {model_id[:40]!r}: {choices}")
    if not _installed(state, model):
        raise NotFound(f"model {model.id} ({model.name}) is not installed on this appliance; installed: "
                       f"{_installed_list(state)}")
    threshold = _threshold(form)
    lang = _choice(form, "lang", ("de", "en"), "de")
    body, original = await dialect.image(form, "file", "url")
    received = time.perf_counter()
    clock = _Clock(state, body)
    make_tags = model.tags
    assert make_tags is not None

    def render(inspection: Inspection) -> Answer:
        _error_detail(inspection)
        found = make_tags(inspection, threshold, lang)
        ended_at = time.time()
        start_ms, end_ms = math.floor(clock.started_at * 1000), math.floor(ended_at * 1000)
        return _json({"name": "Raypack_AI_Filecontainer", "version": "1.0", "license": dialect.settings.license,
                      "results": {"stats": {"modelname": model.modelname, "modelid": model.id,
                                            "originalfile": original, "starttime": start_ms, "endtime": end_ms,
                                            "duration": round((end_ms - start_ms) / 1000, 3)},
                                  "tags": found}})

    answer = await core.inspect(request, state, clock.decode, render, options={"threshold": threshold, "lang": lang},
                                capability=model.capability, started=started, received=received)
    return core.response(answer)


async def raypackfacev3(request: web.Request) -> web.Response:
    started = time.perf_counter()
    state, dialect = _begin(request)
    core.admit(state)
    form = await _read_form(request, state)
    _require_key(request, form, state)
    faces_model = MODELS[3]
    if not _installed(state, faces_model):
        raise NotFound(f"Face AI (model 4, raypackfacev3) is not installed on this appliance; installed: "
                       f"{_installed_list(state)}")
    threshold = _threshold(form)
    mode = _choice(form, "mode", MODES, "image")
    facemode = _choice(form, "facemode", tuple(FACEMODES), "default")
    colour = _colour(form)
    body, _ = await dialect.image(form, "imagef", None)
    received = time.perf_counter()
    clock = _Clock(state, body)
    quality = dialect.settings.jpeg_quality

    def render(inspection: Inspection) -> Answer:
        _error_detail(inspection)
        seconds = time.time() - clock.started_at
        faces = [face for face in inspection.faces if face.score >= threshold]
        assert clock.image is not None
        return face_answer(clock.image, faces, seconds, mode=mode, facemode=facemode, colour=colour,
                           jpeg_quality=quality)

    answer = await core.inspect(request, state, clock.decode, render, options={"threshold": threshold},
                                capability=faces_model.capability, started=started, received=received)
    return core.response(answer)


async def getmodels(request: web.Request) -> web.Response:
    state, _ = _begin(request)
    form = await _read_form(request, state)
    _require_key(request, form, state)
    listed = [{"name": model.name, "id": model.id, "desc": model.desc, "parameters": model.parameters,
               "pricing": "on-premise"} for model in MODELS if _installed(state, model)]
    return web.json_response({"response": listed})
