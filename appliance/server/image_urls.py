"""Fetching an image that a request names by URL, for the APIs whose clients may send one (RAYPACK `url`,
Deepomatic `source`). A line PC has no internet: each API fetches only from the hosts its settings allow."""

from __future__ import annotations

import aiohttp

from appliance.errors import ApplianceError, PayloadTooLarge


async def fetch_image(url: str, *, timeout_s: float, limit: int) -> bytes:
    """GET ``url`` within ``timeout_s`` and ``limit`` bytes, redirects not followed (an allowed host must not
    send the appliance elsewhere). 502 when the host fails or answers another status, 504 on the timeout, 413
    over the limit."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url, allow_redirects=False) as answer:
                if answer.status != 200:
                    raise ApplianceError(f"the image URL answered HTTP {answer.status}", status=502)
                if answer.content_length is not None and answer.content_length > limit:
                    raise PayloadTooLarge(f"the image URL's body of {answer.content_length} bytes exceeds "
                                          f"max_body_bytes {limit}")
                chunks, size = [], 0
                async for chunk in answer.content.iter_chunked(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"the image URL's body exceeds max_body_bytes {limit}")
                    chunks.append(chunk)
                return b"".join(chunks)
    except TimeoutError:
        raise ApplianceError(f"the image URL did not answer within {timeout_s:g} s", status=504) from None
    except aiohttp.ClientError as error:
        raise ApplianceError(f"the image URL could not be fetched ({type(error).__name__})", status=502) from None
