"""tcp: one templated line per inspection to a TCP peer (PEKAT's "Output: TCP"), e.g. a PLC's or an MES's socket."""

from __future__ import annotations

import asyncio
from collections import deque
from itertools import islice
from typing import Literal

from pydantic import Field, field_validator

from appliance.outputs.base import BATCH_MAX, EnvValue, Message, Output, OutputSettings, resolved
from appliance.outputs.template import check_template, render


class TcpSettings(OutputSettings):
    type: Literal["tcp"]
    host: str | EnvValue = Field(description="the peer's address")
    port: int = Field(ge=1, le=65535)
    template: str = Field("$json", description="the line sent, without its end; placeholders: see docs/outputs.md")
    line_end: Literal["\n", "\r\n", ""] = "\n"

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)


class TcpOutput(Output[TcpSettings]):
    settings_model = TcpSettings
    writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        _, self.writer = await asyncio.open_connection(resolved(self.settings.host), self.settings.port)

    def line(self, message: Message) -> bytes:
        return (render(self.settings.template, message) + self.settings.line_end).encode("utf-8")

    async def send(self, message: Message) -> None:
        assert self.writer is not None
        self.writer.write(self.line(message))
        await self.writer.drain()

    async def send_batch(self, pending: deque[Message]) -> None:
        """What is queued in one write (a backlog after a reconnect, or frames finished together)."""
        assert self.writer is not None
        batch = list(islice(pending, BATCH_MAX))
        self.writer.write(b"".join(self.line(message) for message in batch))
        async with asyncio.timeout(self.settings.timeout_s):
            await self.writer.drain()
        self.delivered(pending, len(batch))

    async def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass
