"""API key check for the analyze endpoints (PROTOCOL.md 9, RELIABILITY 5): before any body byte is read."""

from __future__ import annotations

import hmac

from aiohttp import web

from appliance.errors import Unauthorized


def _raw(header_value: str) -> bytes:
    """The bytes the client sent: aiohttp 3.14 decodes header bytes as UTF-8 with surrogateescape (measured in
    its parser), so encoding the same way recovers them exactly, non-UTF-8 bytes included."""
    return header_value.encode("utf-8", "surrogateescape")


def key_candidates(request: web.Request, query: dict[str, bytes]) -> list[bytes]:
    """Every key the request carries, as the raw bytes the client meant."""
    candidates = []
    if "api_key" in query:
        candidates.append(query["api_key"])
    header = request.headers.get("X-API-Key")
    if header is not None:
        candidates.append(_raw(header))
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(_raw(token.strip()))
    return candidates


def require_key(request: web.Request, query: dict[str, bytes], key: bytes | None) -> None:
    """Every key given must match; several that disagree are refused (RELIABILITY 5.3)."""
    if key is None:
        return
    candidates = key_candidates(request, query)
    if not candidates:
        raise Unauthorized("missing API key")
    # compare_digest on bytes: on str it raises TypeError for non-ASCII keys (RELIABILITY 5.4).
    if not all([hmac.compare_digest(candidate, key) for candidate in candidates]):
        raise Unauthorized("wrong API key")
