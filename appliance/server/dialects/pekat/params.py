"""Query parameters as PEKAT clients send them: unencoded, bare flags, `data=None` (PROTOCOL.md 1).

The raw query string is parsed here, not through aiohttp's `request.query`, because yarl replaces
invalid UTF-8 with U+FFFD (RELIABILITY 1.13) and hides duplicated names (1.10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from appliance.errors import BadRequest
from appliance.nodes.base import OVERRIDABLE

RESPONSE_TYPES = ("context", "image", "annotated_image", "heatmap")
IMAGE_FORMATS = ("png", "jpeg")
_TRUE = frozenset({"", "1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_DIMENSION = re.compile(r"[0-9]{1,5}")
# Node settings a request may replace where the flow allows it (a node's `overrides`; declared in nodes/base.py).
OVERRIDES = OVERRIDABLE
_LANG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})?")
_NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,9})?")
# Names this server reads: each may appear once (RELIABILITY 1.10). Others are ignored (1.11).
KNOWN = ("response_type", "data", "context_in_body", "api_key", "width", "height", "bayer", "name", "key",
         "image_format", "jpeg_quality", "model", "version", "lang", *OVERRIDES)
# (`name` also names the person of POST /faces/enrol.)


def parse_query(raw_query: str) -> dict[str, bytes]:
    """Raw query -> {name: value bytes} for the known names; `+` is a space, as browsers and requests mean it."""
    seen: dict[str, list[bytes]] = {}
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        name_text = unquote_to_bytes(name.replace("+", " ")).decode("utf-8", "replace")
        if name_text in KNOWN:
            seen.setdefault(name_text, []).append(unquote_to_bytes(value.replace("+", " ")))
    for name, values in seen.items():
        if len(values) > 1:
            raise BadRequest(f"query parameter '{name}' given {len(values)} times")
    return {name: values[0] for name, values in seen.items()}


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not valid UTF-8") from None


@dataclass(frozen=True)
class AnalyzeParams:
    response_type: str
    data: str
    context_in_body: bool
    image_format: str | None
    jpeg_quality: int | None
    # For the flow's nodes: validated overrides (threshold, max_labels, min_confidence) and lang.
    request: dict[str, float | int | str]


def text(query: dict[str, bytes], name: str) -> str:
    """A required text parameter."""
    if name not in query or not query[name]:
        raise BadRequest(f"missing query parameter '{name}'")
    return _text(name, query[name])


def flag(query: dict[str, bytes], name: str) -> bool:
    """A bare flag is true (the SDK sends `&context_in_body`); 1/true/yes/on and 0/false/no/off; else 400."""
    if name not in query:
        return False
    text = _text(name, query[name]).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadRequest(f"{name} must be a boolean (1/0/true/false), got '{text[:40]}'")


def dimension(query: dict[str, bytes], name: str) -> int:
    """width/height: only ASCII digits, 1..65535 (int() would take '+5', ' 5', '٣' and '1_000')."""
    if name not in query:
        raise BadRequest(f"missing query parameter '{name}'")
    raw = query[name]
    shown = raw[:40].decode("utf-8", "replace")
    text = raw.decode("ascii", "replace")
    if not _DIMENSION.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise BadRequest(f"{name} must be a whole number from 1 to 65535, got '{shown}'")
    return int(text)


def request_options(query: dict[str, bytes], ranges: dict[str, tuple[float, float]]) -> dict[str, float | int | str]:
    """`lang` and the overrides the flow allows (``ranges``: name -> accepted range); anything else is a 400."""
    options: dict[str, float | int | str] = {}
    if "lang" in query:
        lang = query["lang"].decode("ascii", "replace")
        if not _LANG.fullmatch(lang):
            raise BadRequest(f"lang must be a language code such as en or de-AT, got '{lang[:20]}'")
        options["lang"] = lang.lower()
    for name in OVERRIDES:
        if name not in query:
            continue
        text = query[name].decode("ascii", "replace")
        if name not in ranges:
            raise BadRequest(f"{name} cannot be set by a request in this project: no node of its flow lists "
                             f"it in `overrides`")
        low, high = ranges[name]
        whole = name == "max_labels"
        pattern = _DIMENSION if whole else _NUMBER
        if not pattern.fullmatch(text) or not low <= float(text) <= high:
            kind = "a whole number" if whole else "a number"
            raise BadRequest(f"{name} must be {kind} from {low:g} to {high:g}, got '{text[:20]}'")
        options[name] = int(text) if whole else float(text)
    return options


def analyze_params(query: dict[str, bytes], *, max_data_bytes: int,
                   ranges: dict[str, tuple[float, float]] | None = None) -> AnalyzeParams:
    response_type = _text("response_type", query.get("response_type", b"context")) or "context"
    if response_type not in RESPONSE_TYPES:
        raise BadRequest(f"response_type must be one of {', '.join(RESPONSE_TYPES)}; got '{response_type[:40]}'")
    raw_data = query.get("data", b"")
    if len(raw_data) > max_data_bytes:
        raise BadRequest(f"data has {len(raw_data)} bytes; limit is {max_data_bytes}")
    image_format = None
    if "image_format" in query:
        image_format = _text("image_format", query["image_format"]).lower()
        if image_format == "jpg":
            image_format = "jpeg"
        if image_format not in IMAGE_FORMATS:
            raise BadRequest(f"image_format must be png or jpeg; got '{image_format[:20]}'")
    jpeg_quality = None
    if "jpeg_quality" in query:
        text = query["jpeg_quality"].decode("ascii", "replace")
        if not text.isdigit() or not 1 <= int(text) <= 100:
            raise BadRequest(f"jpeg_quality must be a whole number from 1 to 100, got '{text[:20]}'")
        jpeg_quality = int(text)
    return AnalyzeParams(
        response_type=response_type,
        data=_text("data", raw_data),
        context_in_body=flag(query, "context_in_body"),
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        request=request_options(query, ranges or {}),
    )
