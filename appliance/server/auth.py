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


def key_name(presented: bytes, keys: dict[str, bytes]) -> str | None:
    """The name of the project's key that ``presented`` is, or None. Every key is compared, in constant time
    (compare_digest on bytes: on str it raises TypeError for non-ASCII keys, RELIABILITY 5.4)."""
    found = None
    for name, key in keys.items():
        if hmac.compare_digest(presented, key):
            found = name
    return found


def require_key(request: web.Request, query: dict[str, bytes], keys: dict[str, bytes]) -> str | None:
    """The name of the key the request carries (None when the project needs none). Every key given must be
    the same project key; several that disagree are refused (RELIABILITY 5.3)."""
    if not keys:
        return None
    candidates = key_candidates(request, query)
    if not candidates:
        raise Unauthorized("missing API key")
    names = [key_name(candidate, keys) for candidate in candidates]
    if names[0] is None or any(name != names[0] for name in names):
        raise Unauthorized("wrong API key")
    return names[0]
