"""Reading request bodies within the project's limits (RELIABILITY 2): size decided from the headers first."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web

from appliance.config.project import Limits
from appliance.errors import ApplianceError, BadRequest, ClientGone, PayloadTooLarge

CLOSE = {"Connection": "close"}


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
            if request.content_length:
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


async def read_form(request: web.Request, limits: Limits, filenames: dict[str, str] | None = None
                    ) -> tuple[dict[str, str], dict[str, bytes]]:
    """A form body, multipart or urlencoded, within the body limit and time: (text fields, file parts). A part
    with a filename, or whose bytes are not UTF-8, is a file; text fields over 64 KiB are refused. A name given
    twice keeps its first value (the vendor APIs read forms with the first value). ``filenames``, when given,
    receives the filename each file part was sent with."""
    check_declared_size(request, limits)
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            if request.content_type == "multipart/form-data":
                reader = await request.multipart()
                size = 0
                while (part := await reader.next()) is not None:
                    if not isinstance(part, BodyPartReader):
                        raise BadRequest("nested multipart bodies are not supported")
                    name = part.name or ""
                    chunks = []
                    while chunk := await part.read_chunk(1 << 20):
                        size += len(chunk)
                        if size > limits.body_bytes:
                            raise too_large(size, limits.body_bytes)
                        chunks.append(chunk)
                    value = b"".join(chunks)
                    if part.filename is None and len(value) <= MAX_FIELD_BYTES:
                        try:
                            fields.setdefault(name, value.decode("utf-8"))
                            continue
                        except UnicodeDecodeError:
                            pass
                    files.setdefault(name, value)
                    if filenames is not None and part.filename is not None:
                        filenames.setdefault(name, part.filename)
            elif request.content_type == "application/x-www-form-urlencoded":
                body = await read_body(request, limits)
                for key, text in parse_qsl(bytes(body).decode("utf-8", "replace"), keep_blank_values=True):
                    fields.setdefault(key, text)
    except TimeoutError:
        raise ApplianceError(f"body not received within {limits.body_read_timeout_s:g} s", status=408,
                             headers=CLOSE) from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limits.body_bytes + 1, limits.body_bytes) from None
    except ValueError as error:
        raise BadRequest(f"form body could not be parsed: {str(error)[:100]}") from None
    return fields, files
