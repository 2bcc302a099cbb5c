"""Reading request bodies within the project's limits (RELIABILITY 2): size decided from the headers first."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qsl

from aiohttp import web

from appliance.config.project import Limits
from appliance.errors import ApplianceError, BadRequest, ClientGone, PayloadTooLarge

CLOSE = {"Connection": "close"}


def media_type(request: web.Request) -> str:
    """The Content-Type without its parameters, lower case. aiohttp's `request.content_type` parses the header
    with the email package on every new value, and a multipart header is new each time (its boundary): 0.4 ms
    per request, measured with py-spy, a tenth of a form request's own time on the event loop."""
    return request.headers.get("Content-Type", "").partition(";")[0].strip().lower()


def too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"body of {size} bytes exceeds max_body_bytes {limit}", headers=CLOSE)


def check_declared_size(request: web.Request, limits: Limits) -> None:
    """Refuse from Content-Length before reading: aiohttp would hang waiting for an over-limit body (2.1)."""
    size = request.content_length
    if size is not None and size > limits.body_bytes:
        raise too_large(size, limits.body_bytes)


async def _read_declared(request: web.Request, size: int) -> bytearray:
    """Fill one buffer of the declared size: no growing bytearray and no final copy, as request.read() does."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    filled = 0
    content = request.content
    while filled < size:
        chunk = await content.readany()
        if not chunk:
            raise ClientGone("upload")
        end = filled + len(chunk)
        if end > size:
            raise BadRequest(f"body is longer than its Content-Length {size}")
        view[filled:end] = chunk
        filled = end
    return buffer


async def read_body(request: web.Request, limits: Limits) -> bytes | bytearray:
    check_declared_size(request, limits)
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            # A compressed body (Content-Encoding: gzip, deflate, as tritonclient sends on request) arrives
            # inflated by aiohttp: its Content-Length counts the compressed bytes, so it is read whole, under
            # client_max_size (= max_body_bytes) inflated.
            if request.content_length and "Content-Encoding" not in request.headers:
                return await _read_declared(request, request.content_length)
            return await request.read()
    except TimeoutError:
        raise ApplianceError(f"body not received within {limits.body_read_timeout_s:g} s", status=408,
                             headers=CLOSE) from None
    except web.HTTPRequestEntityTooLarge:
        # A chunked upload that grew past client_max_size (= max_body_bytes), 2.2.
        raise too_large(limits.body_bytes + 1, limits.body_bytes) from None
    except ConnectionResetError:
        raise ClientGone("upload") from None


async def read_multipart_file(request: web.Request, limits: Limits) -> bytes:
    """The part named `file` of a multipart/form-data body, read in chunks under the body limit (3.12, 3.13)."""
    check_declared_size(request, limits)
    names: list[str] = []
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                name = getattr(part, "name", None) or ""
                if name != "file":
                    names.append(name)
                    continue
                chunks, size = [], 0
                while chunk := await part.read_chunk(1 << 20):  # type: ignore[union-attr]
                    size += len(chunk)
                    if size > limits.body_bytes:
                        raise too_large(size, limits.body_bytes)
                    chunks.append(chunk)
                return b"".join(chunks)
    except TimeoutError:
        raise ApplianceError(f"body not received within {limits.body_read_timeout_s:g} s", status=408,
                             headers=CLOSE) from None
    except ValueError as error:
        raise BadRequest(f"multipart body could not be parsed: {str(error)[:100]}") from None
    present = ", ".join(n for n in names if n) or "none"
    raise BadRequest(f"multipart body has no 'file' field (fields present: {present})")


MAX_FIELD_BYTES = 65_536
_BOUNDARY = re.compile(r'(?i);\s*boundary\s*=\s*(?:"([^"]{1,70})"|([^\s;"]{1,70}))')
_DISPOSITION_PARAMETER = re.compile(r'(?i);\s*(name|filename)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def split_multipart(body: bytes | bytearray, content_type: str) -> list[tuple[str, str | None, bytes]]:
    """(name, filename or None, bytes) of each part of a multipart/form-data body (RFC 7578), in order.

    Read whole and split at the boundary: the vendor APIs' forms are a few fields and one image, and aiohttp's
    streaming reader parses each part's headers through the email package, which cost more than the split."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise BadRequest("multipart body without a boundary in its Content-Type")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    position = body.find(delimiter)
    if position < 0:
        raise BadRequest("multipart body does not contain its boundary")
    parts = []
    position += len(delimiter)
    while not body.startswith(b"--", position):
        line_end = body.find(b"\r\n", position)
        head_end = body.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            raise BadRequest("multipart body is cut short: a part has no end boundary")
        name, filename = "", None
        for line in bytes(body[line_end + 2:head_end]).split(b"\r\n"):
            header, _, value = line.partition(b":")
            if header.strip().lower() == b"content-disposition":
                for key, quoted, bare in _DISPOSITION_PARAMETER.findall(value.decode("utf-8", "replace")):
                    text = re.sub(r"\\(.)", r"\1", quoted) if quoted else bare
                    if key.lower() == "name":
                        name = text
                    else:
                        filename = text
        parts.append((name, filename, bytes(body[head_end + 4:end])))
        position = end + 2 + len(delimiter)
    return parts


async def read_form(request: web.Request, limits: Limits, filenames: dict[str, str] | None = None
                    ) -> tuple[dict[str, str], dict[str, bytes]]:
    """A form body, multipart or urlencoded, within the body limit and time: (text fields, file parts). A part
    with a filename, or a text part over 64 KiB or not UTF-8, is a file. A name given twice keeps its first
    value (the vendor APIs read forms with the first value). ``filenames``, when given, receives the filename
    each file part was sent with."""
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    kind = media_type(request)
    if kind == "multipart/form-data":
        body = await read_body(request, limits)
        for name, filename, value in split_multipart(body, request.headers.get("Content-Type", "")):
            if filename is None and len(value) <= MAX_FIELD_BYTES:
                try:
                    fields.setdefault(name, value.decode("utf-8"))
                    continue
                except UnicodeDecodeError:
                    pass
            files.setdefault(name, value)
            if filenames is not None and filename is not None:
                filenames.setdefault(name, filename)
    elif kind == "application/x-www-form-urlencoded":
        body = await read_body(request, limits)
        for key, text in parse_qsl(bytes(body).decode("utf-8", "replace"), keep_blank_values=True):
            fields.setdefault(key, text)
    else:
        check_declared_size(request, limits)
    return fields, files
