"""What a dialect is: one vendor's API over the serving core, with its routes, its settings and its error shape.

A dialect parses its own requests, asks the core (server/core.py) to inspect a frame with the flow of a
capability, renders the neutral Inspection in its own shape, and renders every error raised on its routes,
wherever it was raised, in its own error shape (the error middleware asks it).
"""

from __future__ import annotations

import json
from typing import ClassVar

from aiohttp import web
from pydantic import BaseModel

from appliance.config.apis import NoSettings
from appliance.errors import ApplianceError, NotFound
from appliance.server.core import ServerState


def status_message_body(status: int, message: str) -> bytes:
    """The core's own error shape, also PEKAT's: {"status": N, "message": "...", "data": null}."""
    return json.dumps({"status": status, "message": message, "data": None}).encode("utf-8")


class Dialect:
    """One vendor API served on the project's port."""

    name: ClassVar[str]
    # Settings under project.yaml `api_settings.<name>`, validated with their places at load.
    settings_model: ClassVar[type[BaseModel]] = NoSettings
    # Path prefixes this API owns: a request for an unknown path or method under them gets this API's error shape.
    prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, state: ServerState, settings: BaseModel):
        self.state = state
        self.settings = settings

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def endpoints(self) -> list[str]:
        """The paths this API serves, for the message of a 404."""
        return sorted({route.path for route in self.routes()})

    def not_found(self, request: web.Request) -> ApplianceError:
        return NotFound(f"no endpoint at {request.path[:200]}; endpoints: {', '.join(self.endpoints())}")

    def error_response(self, error: ApplianceError) -> web.StreamResponse:
        """The error as answered: in this API's shape, closing the connection when the error asks for it (a body
        left unread)."""
        response = self.render_error(error)
        if error.headers.get("Connection") == "close":
            response.force_close()
        return response

    def render_error(self, error: ApplianceError) -> web.StreamResponse:
        """The error in this API's shape; by default the core's {"status", "message", "data": null}."""
        return web.Response(body=status_message_body(error.status, error.message), status=error.status,
                            content_type="application/json", headers=error.headers)

    async def start(self) -> None:
        """Called once the app runs (e.g. to start a background task)."""

    async def stop(self) -> None:
        """Called when the app shuts down."""
