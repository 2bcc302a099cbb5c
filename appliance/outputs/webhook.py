"""webhook: one HTTP request per inspection (aiohttp's client), e.g. to an MES; a non-2xx answer is retried."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

import aiohttp
from pydantic import Field, field_validator, model_validator

from appliance.outputs.base import EnvValue, Message, Output, OutputSettings, resolved
from appliance.outputs.template import check_template, render


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook url {url!r}: write http://host[:port]/path or https://...")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as error:
        raise ValueError(f"webhook url {url!r}: {error}") from None
    return url


class WebhookSettings(OutputSettings):
    type: Literal["webhook"]
    url: str | EnvValue = Field(description="http:// or https:// address the message is sent to")
    method: Literal["POST", "PUT"] = "POST"
    template: str | None = Field(None, description="the body as text; default: the message as JSON")
    content_type: str | None = Field(None, description="default: application/json for the JSON body, "
                                     "text/plain; charset=utf-8 for a template")
    headers: dict[str, str | EnvValue] = Field(default_factory=dict, description="e.g. Authorization from the "
                                               "environment: {env: MES_TOKEN}")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | EnvValue) -> str | EnvValue:
        return check_url(value) if isinstance(value, str) else value

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str | EnvValue]) -> dict[str, str | EnvValue]:
        for name in value:
            if not name or any(c in name for c in " :\r\n\t") or not name.isascii():
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
        return value

    @model_validator(mode="after")
    def _resolved_url(self) -> WebhookSettings:
        if isinstance(self.url, EnvValue):
            try:
                url = self.url.resolve()
            except ValueError:
                return self  # the loader reports the missing variable with its place
            check_url(url)
        for name, header in self.headers.items():
            if isinstance(header, EnvValue):
                try:
                    header.resolve()
                except ValueError as error:
                    raise ValueError(f"header {name}: {error}") from None
        return self


class WebhookFailed(Exception):
    pass


class WebhookOutput(Output[WebhookSettings]):
    settings_model = WebhookSettings
    session: aiohttp.ClientSession | None = None

    def body(self, message: Message) -> tuple[bytes, str]:
        if self.settings.template is not None:
            text, content_type = render(self.settings.template, message), "text/plain; charset=utf-8"
        else:
            text, content_type = message.json, "application/json"
        return text.encode("utf-8"), self.settings.content_type or content_type

    async def connect(self) -> None:
        headers = {name: resolved(value) for name, value in self.settings.headers.items()}
        self.session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))

    async def send(self, message: Message) -> None:
        assert self.session is not None
        body, content_type = self.body(message)
        async with self.session.request(self.settings.method, resolved(self.settings.url), data=body,
                                        headers={"Content-Type": content_type}) as answer:
            await answer.read()
            if not 200 <= answer.status < 300:
                raise WebhookFailed(f"HTTP {answer.status} {answer.reason or ''}".rstrip())

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            try:
                await session.close()
            except Exception:  # noqa: BLE001 - closing never raises
                pass
