"""API key check for the analyze endpoints (PROTOCOL.md 9, RELIABILITY 5): before any body byte is read."""

from __future__ import annotations

import hmac

from aiohttp import web

from appliance.errors import Unauthorized


def key_candidates(request: web.Request, query: dict[str, bytes]) -> list[bytes]:
    """Every key the request carries, as the raw bytes the client meant."""
    candidates = []
    if "api_key" in query:
        candidates.append(query["api_key"])
    # aiohttp decodes header bytes as Latin-1 (with surrogateescape for the rest); re-encoding recovers them.
    header = request.headers.get("X-API-Key")
    if header is not None:
        candidates.append(header.encode("latin-1", "surrogateescape"))
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            candidates.append(token.strip().encode("latin-1", "surrogateescape"))
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
