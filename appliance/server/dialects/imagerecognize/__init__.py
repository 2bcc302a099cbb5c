"""The imagerecognize.com API (`/api/v2/`, `/api/v3/`), as its documentation and examples use it (docs/apis.md).

One endpoint, GET (type=cache only) or POST, form fields `apikey`, `type`, `file`, `max_labels`,
`min_confidence`, `nsfw_min_confidence`. Success: `{"status": 200, "message": "Success", "data": {"error": 0,
"type": ..., "objects": [...], "quota": ...}}`; errors: `{"status": N, "status_message": "...", "data": null}`
with the same HTTP status, for the document's codes 300, 400, 401, 402, 412, 413, 415, 420 and 430. Every answer
is `text/html; charset=UTF-8` with a JSON body, as the PHP original sends it: the document's jQuery example
calls `JSON.parse` on the body, which fails if jQuery has already parsed an `application/json` answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web
from pydantic import BaseModel

from appliance import frames
from appliance.config.apis import ImageRecognizeSettings
from appliance.errors import ApplianceError, BadRequest, PayloadTooLarge, UnsupportedMediaType
from appliance.server import core
from appliance.server.auth import key_name
from appliance.server.body import CLOSE, read_form
from appliance.server.core import STATE, ServerState
from appliance.server.dialects.base import Dialect
from appliance.server.dialects.imagerecognize import results
from appliance.server.dialects.imagerecognize.accounts import QuotaBook, ResultCache
from appliance.server.inspection import Inspection
from appliance.server.render import Answer

log = logging.getLogger("appliance.server.imagerecognize")

PATHS = ("/api/v2", "/api/v2/", "/api/v3", "/api/v3/")
# type -> the capability that answers it (project.yaml `capabilities:`).
CAPABILITIES = {"objects": "objects", "detect_faces": "faces", "detect_text": "text", "nsfw": "nsfw",
                "celebrities": "identities"}
TYPES = (*CAPABILITIES, "cache")
# The form's text fields besides apikey (whose raw bytes are compared as they are).
TEXT_FIELDS = ("type", "max_labels", "min_confidence", "nsfw_min_confidence")
# The document's messages, by status.
MESSAGES = {300: "Invalid request, no data received", 400: "APIkey missing", 401: "APIkey invalid",
            402: "Quota limit reached", 412: "Invalid file", 413: "Image size too large",
            415: "Invalid file format", 420: "Invalid type"}
# What a key with no quota reports as `quota`: a number, so that clients comparing it keep working.
UNLIMITED = 2**31 - 1
# A form's fields besides the file: a body this much over max_file_bytes cannot hold an allowed file.
FORM_OVERHEAD = 1 << 20
# The largest max_labels handed to a flow (nodes accept 1..1000); larger values mean "all" anyway.
MAX_LABELS = 1000
DEFAULT_NSFW_MIN_CONFIDENCE = 50.0
CONTENT_TYPE = "text/html; charset=UTF-8"
# Reason phrases of the document's codes that HTTP does not name (aiohttp would send none).
REASONS = {420: "Invalid type", 430: "Invalid parameter"}


class ImageRecognizeError(ApplianceError):
    """An error of this API, rendered as it is: the status and the document's message."""

    def __init__(self, status: int, detail: str = "", *, headers: dict[str, str] | None = None):
        message = MESSAGES.get(status, "")
        if detail:
            message = f"{message}: {detail}" if message else detail
        super().__init__(message, status=status, headers=headers)


def _json(document: dict[str, Any]) -> bytes:
    """Compact, non-ASCII as \\u escapes (PHP's json_encode), and <, > and & escaped too (PHP's JSON_HEX_TAG,
    JSON_HEX_AMP): the body is sent as text/html and carries text read from images, which a browser opening the
    URL, or the document's example page (`innerHTML = response`), must not run as markup."""
    text = json.dumps(document, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("ascii")


def _response(body: bytes, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, reason=REASONS.get(status),
                        headers={**(headers or {}), "Content-Type": CONTENT_TYPE})


def _success(kind: str, objects: list[dict[str, Any]], quota: int | None, error: str | int = 0) -> web.Response:
    data = {"error": error, "type": kind, "objects": objects, "quota": UNLIMITED if quota is None else quota}
    return _response(_json({"status": 200, "message": "Success", "data": data}), 200)


def _invalid(name: str, value: str, expected: str) -> ImageRecognizeError:
    shown = value if len(value) <= 40 else value[:40] + "..."
    return ImageRecognizeError(430, f"Invalid parameter {name}: {shown!r} is not {expected}")


def _positive_int(fields: dict[str, str], name: str) -> int | None:
    value = fields.get(name)
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or int(text) <= 0:
        raise _invalid(name, value, "an integer > 0")
    return int(text)


def _percentage(fields: dict[str, str], name: str) -> float | None:
    """0 <= value <= 100; the document says int, decimals such as "80.5" are accepted too."""
    value = fields.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value.strip()) if value.strip().isascii() else math.nan
    except ValueError:
        number = math.nan
    if not 0 <= number <= 100:  # NaN fails too
        raise _invalid(name, value, "a number from 0 to 100")
    return number


async def _read_request(request: web.Request, state: ServerState, settings: ImageRecognizeSettings
                        ) -> tuple[dict[str, str], dict[str, bytes]]:
    """The form (POST) and the query, form first: text fields and file parts. Query values are decoded with
    surrogateescape, so a key's raw bytes come back with .encode("utf-8", "surrogateescape")."""
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    if request.method == "POST":
        size = request.content_length
        if size is not None and size > settings.max_file_bytes + FORM_OVERHEAD:
            raise ImageRecognizeError(413, headers=CLOSE)
        if size != 0:
            core.admit(state)
            try:
                fields, files = await read_form(request, state.project.config.limits)
            except BadRequest as error:
                log.info("imagerecognize: form not read: %s", error.message)
                raise ImageRecognizeError(300) from None
    for part in request.rel_url.raw_query_string.split("&"):
        name, equals, value = part.partition("=")
        if not name and not equals:
            continue
        key = unquote_to_bytes(name.replace("+", " ")).decode("utf-8", "replace")
        if key not in fields and key not in files:
            fields[key] = unquote_to_bytes(value.replace("+", " ")).decode("utf-8", "surrogateescape")
    return fields, files


async def recognize(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    state = request.app[STATE]
    dialect: ImageRecognize = state.dialects[ImageRecognize.name]  # type: ignore[assignment]
    settings: ImageRecognizeSettings = dialect.settings  # type: ignore[assignment]
    fields, files = await _read_request(request, state, settings)
    received = time.perf_counter()
    if not fields and not files:
        raise ImageRecognizeError(300)
    for name in TEXT_FIELDS:
        if name in files and name not in fields:  # sent as a file part, or a text over 64 KiB
            fields[name] = files.pop(name)[:1000].decode("utf-8", "replace")
    account = dialect.account(fields, files)
    kind = fields.get("type", "")
    if kind not in TYPES:
        raise ImageRecognizeError(420)
    if request.method != "POST" and kind != "cache":
        raise ImageRecognizeError(420, f"GET is only allowed with type 'cache'; POST the file for '{kind}'")
    if kind == "cache":
        return _success(kind, dialect.cache.of(account), dialect.quota.remaining(account))
    capability = CAPABILITIES[kind]
    problem = state.project.capability_problem(capability)
    if problem is not None:
        raise ImageRecognizeError(420, f"'{kind}' is not installed on this appliance: {problem}")
    options: dict[str, Any] = {}
    max_labels = min_confidence = None
    nsfw_min_confidence = DEFAULT_NSFW_MIN_CONFIDENCE
    if kind == "objects":
        max_labels = _positive_int(fields, "max_labels")
        min_confidence = _percentage(fields, "min_confidence")
        if max_labels is not None:
            options["max_labels"] = min(max_labels, MAX_LABELS)
        if min_confidence is not None:
            options["min_confidence"] = min_confidence / 100
    elif kind == "nsfw":
        given = _percentage(fields, "nsfw_min_confidence")
        nsfw_min_confidence = DEFAULT_NSFW_MIN_CONFIDENCE if given is None else given
    image = files.get("file")
    if image is None and "file" in fields:
        image = fields["file"].encode("utf-8", "surrogateescape")  # a text field, not an upload
    if image is None:
        raise ImageRecognizeError(430, "Missing parameter file: send the image as the form's 'file' field")
    if len(image) > settings.max_file_bytes:
        raise ImageRecognizeError(413)
    if len(image) == 0:
        raise ImageRecognizeError(412)
    if frames.sniff_image_format(image) not in ("jpeg", "png"):
        raise ImageRecognizeError(415)
    if not dialect.quota.take(account):
        raise ImageRecognizeError(402)
    limits = state.project.config.limits
    color = state.project.config.color

    def decode() -> frames.Frame:
        try:
            return frames.decode_image(image, max_frame_pixels=limits.max_frame_pixels, color=color)
        except PayloadTooLarge as error:
            log.info("imagerecognize: %s", error.message)
            raise ImageRecognizeError(413, headers=error.headers) from None
        except UnsupportedMediaType as error:
            log.info("imagerecognize: %s", error.message)
            raise ImageRecognizeError(415) from None
        except BadRequest as error:
            log.info("imagerecognize: %s", error.message)
            raise ImageRecognizeError(412) from None

    found: dict[str, Any] = {}

    def render(inspection: Inspection) -> Answer:
        if kind == "objects":
            found["objects"] = results.objects(inspection, max_labels, min_confidence)
        elif kind == "detect_faces":
            found["objects"] = results.faces(inspection)
        elif kind == "detect_text":
            found["objects"] = results.text(inspection)
        elif kind == "nsfw":
            found["objects"] = results.nsfw(inspection, nsfw_min_confidence)
        else:
            found["objects"] = results.celebrities(inspection)
        found["error"] = results.error_description(inspection)
        return Answer(b"", CONTENT_TYPE)

    try:
        await core.inspect(request, state, decode, render, options=options, capability=capability,
                           started=started, received=received)
    except BaseException:
        dialect.quota.give_back(account)
        raise
    if found["error"] != 0:
        dialect.quota.give_back(account)  # the analysis failed: not counted, not cached
    else:
        dialect.cache.add(account, kind, found["objects"])
    return _success(kind, found["objects"], dialect.quota.remaining(account), found["error"])


class ImageRecognize(Dialect):
    name = "imagerecognize"
    settings_model = ImageRecognizeSettings
    prefixes = ("/api/v2", "/api/v3")

    def __init__(self, state: ServerState, settings: BaseModel):
        super().__init__(state, settings)
        assert isinstance(settings, ImageRecognizeSettings)
        keys = state.project.api_keys
        unknown = sorted(set(settings.quotas) - set(keys))
        if unknown:
            log.warning("api_settings.imagerecognize.quotas names keys the project does not have: %s (keys: %s)",
                        ", ".join(unknown), ", ".join(sorted(keys)) or "none")
        self.quota = QuotaBook(state.project.files.directory / settings.quota_file, settings.daily_quota,
                               dict(settings.quotas))
        self.cache = ResultCache(settings.cache_size)

    def account(self, fields: dict[str, str], files: dict[str, bytes]) -> str:
        """The name of the request's key (400 without one, 401 for a wrong one). A project without keys takes
        any apikey; each apikey string is then its own account (kept as a SHA-256 prefix, never the key)."""
        given = fields.get("apikey")
        presented = given.encode("utf-8", "surrogateescape") if given is not None else files.get("apikey")
        if not presented:
            raise ImageRecognizeError(400)
        keys = self.state.project.api_keys
        if not keys:
            return "apikey-" + hashlib.sha256(presented).hexdigest()[:16]
        name = key_name(presented, keys)
        if name is None:
            self.state.metrics.auth_failures.inc()
            raise ImageRecognizeError(401)
        return name

    def routes(self) -> list[web.RouteDef]:
        routes = []
        for path in PATHS:
            routes.append(web.get(path, recognize, allow_head=False))
            routes.append(web.post(path, recognize, expect_handler=core.expect_continue))
        return routes

    def render_error(self, error: ApplianceError) -> web.StreamResponse:
        """`{"status": N, "status_message": "...", "data": null}`, HTTP status N. The core's errors on these
        routes: too large -> 413, not a supported image -> 415, other bad input -> 430 with its message;
        503 (busy, deadline, shutting down), 408, 404, 405 and 500 keep their status."""
        status, message = error.status, error.message
        if not isinstance(error, ImageRecognizeError):
            if status == 413:
                message = MESSAGES[413]
            elif status == 415:
                message = MESSAGES[415]
            elif status == 400:
                status = 430
            elif status == 401:
                message = MESSAGES[401]
        return _response(_json({"status": status, "status_message": message, "data": None}), status,
                           {k: v for k, v in error.headers.items() if k != "WWW-Authenticate"})

    async def stop(self) -> None:
        await self.quota.flush()
