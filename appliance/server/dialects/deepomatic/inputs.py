"""Reading Deepomatic request bodies: JSON (leniently: the seed's curl joins a JSON object and form fields with
`&`), form-encoded fields, and DRF-style multipart inference bodies (`inputs[0]image.source` parts)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

from appliance.config.project import Limits
from appliance.errors import BadRequest
from appliance.server.body import media_type, read_body, read_form
from appliance.server.dialects.deepomatic.registry import shown

# strict=False: the seed's `$(cat img.jpg | base64)` puts raw newlines inside the JSON string.
_JSON = json.JSONDecoder(strict=False)
_FLAT = re.compile(r"^inputs\[(\d{1,4})\]\.?image\.(source|crop_uniform_background|bbox\.(?:xmin|ymin|xmax|ymax))$")
_WHITESPACE = re.compile(rb"\s+")
MAX_PREDICTIONS = 1000


def parse_fields(body: bytes, content_type: str) -> dict[str, Any]:
    """A JSON object, or form fields; a JSON object followed by `&name=value...` gets those fields too (the seed's
    `-d '{...}' -d show_discarded="True"` under application/json). An empty body is no fields."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body is not UTF-8 text; send JSON, or multipart/form-data for image files") from None
    stripped = text.strip()
    if not stripped:
        return {}
    if stripped.startswith("{"):
        try:
            data, end = _JSON.raw_decode(stripped)
        except json.JSONDecodeError as error:
            raise BadRequest(f"body is not valid JSON: {error.msg} at character {error.pos}") from None
        tail = stripped[end:].strip()
        if tail:
            if not tail.startswith("&"):
                raise BadRequest(f"body is not valid JSON: unexpected text after the JSON object at character {end}")
            for key, value in _form(tail[1:]).items():
                data.setdefault(key, value)
        return data
    if content_type == "application/json" or stripped.startswith("["):
        raise BadRequest("body must be a JSON object")
    return _form(stripped)


def _form(text: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise BadRequest("form body could not be parsed; send JSON or name=value pairs joined with &") from None
    for key, value in pairs:
        fields.setdefault(key, value)
    return fields


async def read_fields(request: web.Request, limits: Limits) -> dict[str, Any]:
    """The fields of a JSON, form-encoded or multipart body (multipart files are refused here)."""
    if media_type(request) == "multipart/form-data":
        fields, files = await read_form(request, limits)
        if files:
            raise BadRequest(f"unexpected file part {sorted(files)[0]!r}")
        return dict(fields)
    return parse_fields(bytes(await read_body(request, limits)), media_type(request))


def boolean(name: str, value: Any, default: bool) -> bool:
    """JSON booleans, and the forms' True/False/true/false/1/0 (the Python client sends `True`)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise BadRequest(f"{name} must be a boolean (true, false, 1 or 0), got {shown(value)}")


def max_predictions(value: Any) -> int:
    if value is None:
        return 100
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PREDICTIONS:
        raise BadRequest(f"max_predictions must be an integer from 0 to {MAX_PREDICTIONS}, got {shown(value)}")
    return value


@dataclass(frozen=True)
class ImageSource:
    """One input image: its bytes, or an allowed URL to fetch; `bbox` (normalised xmin, ymin, xmax, ymax)."""

    where: str
    data: bytes | None = None
    url: str | None = None
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class InferenceRequest:
    inputs: list[ImageSource]
    show_discarded: bool
    max_predictions: int


def _bbox(where: str, value: Any) -> tuple[float, float, float, float]:
    keys = ("xmin", "ymin", "xmax", "ymax")
    if not isinstance(value, dict) or set(value) != set(keys):
        raise BadRequest(f"{where}.bbox must be {{\"xmin\", \"ymin\", \"xmax\", \"ymax\"}} (0 to 1 of the image)")
    numbers = []
    for key in keys:
        item = value[key]
        if isinstance(item, str):
            try:
                item = float(item)
            except ValueError:
                pass
        if not isinstance(item, int | float) or isinstance(item, bool) or not 0 <= item <= 1:
            raise BadRequest(f"{where}.bbox.{key} must be a number from 0 to 1, got {shown(value[key])}")
        numbers.append(float(item))
    xmin, ymin, xmax, ymax = numbers
    if xmin >= xmax or ymin >= ymax:
        raise BadRequest(f"{where}.bbox is empty: xmin must be below xmax and ymin below ymax")
    return xmin, ymin, xmax, ymax


def _source(where: str, source: Any, url_hosts: tuple[str, ...]) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a data URI, (None, url) for an allowed http(s) URL."""
    if not isinstance(source, str):
        raise BadRequest(f"{where}.source must be a string (a data:image/...;base64, URI or an http(s) URL)")
    if source.startswith(("http://", "https://")):
        parts = urlsplit(source)
        host = (parts.hostname or "").lower()
        port_host = f"{host}:{parts.port}" if parts.port else host
        if host and (host in url_hosts or port_host in url_hosts):
            return None, source
        raise BadRequest(f"{where}.source: URL sources are not fetched by the appliance (host {host or '?'} is not "
                         "in api_settings.deepomatic.url_hosts); send the image itself, as a multipart file part "
                         "or as data:image/*;base64,...")
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        media = header[5:].split(";")
        if not comma or not media[0].startswith("image/") or len(media) < 2 or media[-1] not in ("base64", "binary"):
            raise BadRequest(f"{where}.source: a data URI must start with data:image/<type>;base64, or "
                             "data:image/<type>;binary,")
        if media[-1] == "base64":
            try:
                return base64.b64decode(_WHITESPACE.sub(b"", payload.encode("ascii")), validate=True), None
            except (binascii.Error, UnicodeEncodeError):
                raise BadRequest(f"{where}.source: the data URI's base64 could not be decoded") from None
        try:
            return payload.encode("latin-1"), None
        except UnicodeEncodeError:
            raise BadRequest(f"{where}.source: ;binary, data must be bytes (characters up to U+00FF)") from None
    raise BadRequest(f"{where}.source must start with http:, https: or data:image/, or be a multipart file part")


def _image(where: str, image: Any, url_hosts: tuple[str, ...], raw: bytes | None = None) -> ImageSource:
    if not isinstance(image, dict):
        raise BadRequest(f"{where} must be an object with a 'source'")
    unknown = sorted(set(image) - {"source", "bbox", "crop_uniform_background", "polygon"})
    if unknown:
        raise BadRequest(f"{where}: unknown field {unknown[0]!r}; fields: source, bbox, crop_uniform_background")
    if "polygon" in image:
        raise BadRequest(f"{where}.polygon is not supported by the appliance; use bbox")
    if boolean(f"{where}.crop_uniform_background", image.get("crop_uniform_background"), False):
        raise BadRequest(f"{where}.crop_uniform_background true is not supported by the appliance")
    bbox = _bbox(where, image["bbox"]) if image.get("bbox") is not None else None
    if raw is not None:
        return ImageSource(where, data=raw, bbox=bbox)
    if "source" not in image:
        raise BadRequest(f"{where}.source is required")
    data, url = _source(where, image["source"], url_hosts)
    return ImageSource(where, data=data, url=url, bbox=bbox)


def _options(fields: dict[str, Any], inputs: list[ImageSource]) -> InferenceRequest:
    return InferenceRequest(inputs, boolean("show_discarded", fields.get("show_discarded"), False),
                            max_predictions(fields.get("max_predictions")))


def _check_count(count: int, max_inputs: int) -> None:
    if count == 0:
        raise BadRequest('inputs must be a non-empty list, e.g. [{"image": {"source": "data:image/*;base64,..."}}]')
    if count > max_inputs:
        raise BadRequest(f"{count} inputs; at most {max_inputs} per request (api_settings.deepomatic.max_inputs)")


def from_json(fields: dict[str, Any], url_hosts: tuple[str, ...], max_inputs: int) -> InferenceRequest:
    flat = [key for key in fields if _FLAT.match(key)]
    if flat:  # form-encoded inputs[0]image.source=...
        return _from_flat(fields, {}, url_hosts, max_inputs)
    unknown = sorted(set(fields) - {"inputs", "show_discarded", "max_predictions"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; fields: inputs, show_discarded, max_predictions")
    inputs = fields.get("inputs")
    inputs = inputs if isinstance(inputs, list) else []
    _check_count(len(inputs), max_inputs)
    sources = []
    for index, item in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(item, dict) or "image" not in item or len(item) != 1:
            raise BadRequest(f"{where} must be {{\"image\": {{\"source\": ...}}}} (images are the only input type)")
        sources.append(_image(f"{where}.image", item["image"], url_hosts))
    return _options(fields, sources)


def _from_flat(fields: dict[str, Any], files: dict[str, bytes], url_hosts: tuple[str, ...],
               max_inputs: int) -> InferenceRequest:
    images: dict[int, dict[str, Any]] = {}
    raws: dict[int, bytes] = {}
    options: dict[str, Any] = {}
    for key, value in [*fields.items(), *files.items()]:
        match = _FLAT.match(key)
        if match is None:
            if key not in ("show_discarded", "max_predictions"):
                raise BadRequest(f"unknown field {key!r}; fields: inputs[N]image.source, show_discarded, "
                                 "max_predictions")
            if isinstance(value, bytes):
                raise BadRequest(f"{key} must be a text field")
            options[key] = value
            continue
        index, name = int(match.group(1)), match.group(2)
        image = images.setdefault(index, {})
        if name.startswith("bbox."):
            image.setdefault("bbox", {})[name[5:]] = value
        elif name == "source" and isinstance(value, bytes):
            raws[index] = value
            image["source"] = None
        elif name == "source" and not value.startswith(("http://", "https://", "data:")):
            raws[index] = value.encode("utf-8")  # a small part without a filename: its bytes as they came
            image["source"] = None
        else:
            image[name] = value
    _check_count(len(images), max_inputs)
    if sorted(images) != list(range(len(images))):
        raise BadRequest(f"inputs must be numbered from 0 without gaps, got {sorted(images)}")
    sources = []
    for index in range(len(images)):
        image = images[index]
        if "source" not in image:
            raise BadRequest(f"inputs[{index}]image.source is required")
        raw = raws.get(index)
        if raw is not None:
            image.pop("source")
        sources.append(_image(f"inputs[{index}].image", image, url_hosts, raw))
    return _options(options, sources)


async def read_inference(request: web.Request, limits: Limits, url_hosts: tuple[str, ...],
                         max_inputs: int) -> InferenceRequest:
    if media_type(request) == "multipart/form-data":
        fields, files = await read_form(request, limits)
        return _from_flat(dict(fields), files, url_hosts, max_inputs)
    body = await read_body(request, limits)
    return from_json(parse_fields(bytes(body), media_type(request)), url_hosts, max_inputs)
