"""Context -> PEKAT's answer: JSON, or an image with the context in the body or in a header (PROTOCOL.md 4)."""

from __future__ import annotations

import base64

from appliance.context import Context, to_json
from appliance.errors import ApplianceError
from appliance.server import render
from appliance.server.render import Answer

# Python's http.client refuses header lines over 64 KiB (PROTOCOL.md 4).
MAX_CONTEXT_HEADER = 60_000


def build_answer(ctx: Context, response_type: str, *, context_in_body: bool, image_format: str,
                 jpeg_quality: int) -> Answer:
    if response_type == "context":
        return Answer(to_json(ctx), "application/json", {})
    if response_type == "image":
        picture = ctx["image"]
    elif response_type == "annotated_image":
        picture = render.annotated(ctx)
    else:
        picture = render.heatmap(ctx)
    image_bytes, content_type = render.encode(picture, image_format, jpeg_quality)
    context_json = to_json(ctx)
    if context_in_body:
        return Answer(image_bytes + context_json, "application/octet-stream", {"ImageLen": str(len(image_bytes))})
    header = base64.b64encode(context_json).decode("ascii")
    if len(header) > MAX_CONTEXT_HEADER:
        raise ApplianceError(
            f"context is {len(header)} bytes as a header, over the {MAX_CONTEXT_HEADER} that HTTP clients accept; "
            "add context_in_body to the query to receive it in the body")
    return Answer(image_bytes, content_type, {"ContextBase64utf": header})
