"""The one error type of the appliance: every failure a client can see is an ApplianceError.

The server's error middleware turns it into ``{"status": N, "message": "...", "data": null}``
(PROTOCOL.md section 10), so code anywhere on the data path raises it instead of building responses.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """A failure with the HTTP status and the message the client sees."""

    status = 500

    def __init__(self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message
        self.headers = dict(headers or {})


class BadRequest(ApplianceError):
    status = 400


class Unauthorized(ApplianceError):
    status = 401

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="appliance"'})


class Forbidden(ApplianceError):
    status = 403


class NotFound(ApplianceError):
    status = 404


class PayloadTooLarge(ApplianceError):
    status = 413


class UnsupportedMediaType(ApplianceError):
    status = 415


class ServiceUnavailable(ApplianceError):
    status = 503


class ClientGone(ApplianceError):
    """The client closed its connection; nobody reads the answer, only the metrics and a DEBUG line see it."""

    status = 400

    def __init__(self, phase: str):
        super().__init__(f"client disconnected during {phase}")
        self.phase = phase


class ConfigError(Exception):
    """A project, flow or profile that cannot be served; carries every problem found, not only the first."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class DeviceUnavailable(ConfigError):
    """The firmware profile's device is absent here and no fallback is allowed (exit 69, RELIABILITY 11.4)."""


class NodeError(Exception):
    """A node could not process this frame: the flow records it in `errors`, fails the branch and answers 200.
    Raised by nodes and by what they call (a remote model's failure in runtime/remote.py)."""
