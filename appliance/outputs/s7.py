"""s7: the verdict as bits and values of a Siemens S7 data block (DB), as PEKAT's S7 output writes them.

With python-snap7 (pure Python since 3.0: no native snap7 library). Per inspection, in this order: the values
(counter INT/DINT, score REAL, rectangles INT; contiguous ones in one write), then the bytes holding the result
bits (OK, NG), then the bytes holding the "new result" bits (a toggle that flips, a pulse set for `ms` then
reset); a byte holding a result bit and a handshake bit is written once, with both. A bit is written by reading its
byte and writing it back (S7 has no bit write that every CPU and the test server honour): keep the appliance's bits
in bytes the PLC program does not write itself. snap7's client blocks, so every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import math
import struct
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from appliance.outputs.base import EnvValue, Message, Output, OutputSettings, Pulse, resolved


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S7Bit(_Strict):
    byte: int = Field(ge=0, le=65535)
    bit: int = Field(ge=0, le=7)


class S7Pulse(S7Bit):
    ms: int = Field(200, ge=1, le=60_000, description="how long the bit stays set; it then stays reset as long")


class S7Int(_Strict):
    byte: int = Field(ge=0, le=65534)
    type: Literal["INT", "DINT"] = "DINT"


class S7Real(_Strict):
    byte: int = Field(ge=0, le=65532)


SIZES = {"INT": 2, "DINT": 4, "REAL": 4}


class S7Settings(OutputSettings):
    type: Literal["s7"]
    host: str | EnvValue = Field(description="the PLC's address")
    port: int = Field(102, ge=1, le=65535)
    rack: int = Field(0, ge=0, le=7)
    slot: int = Field(1, ge=0, le=31, description="1 for S7-1200/1500, 2 for S7-300")
    db: int = Field(ge=1, le=65535, description="the data block written")
    ok: S7Bit | None = None
    ng: S7Bit | None = None
    toggle: S7Bit | None = None
    pulse: S7Pulse | None = None
    counter: S7Int | None = Field(None, description="inspections counted: INT mod 65536, DINT mod 2^32")
    score: S7Real | None = Field(None, description="the score as REAL (0.0 when the flow gives none)")
    rectangles: S7Int | None = None

    @model_validator(mode="after")
    def _layout(self) -> S7Settings:
        bits = {name: getattr(self, name) for name in ("ok", "ng", "toggle", "pulse") if getattr(self, name)}
        values: dict[str, tuple[int, int]] = {}
        if self.counter is not None:
            values["counter"] = (self.counter.byte, SIZES[self.counter.type])
        if self.score is not None:
            values["score"] = (self.score.byte, SIZES["REAL"])
        if self.rectangles is not None:
            values["rectangles"] = (self.rectangles.byte, SIZES[self.rectangles.type])
        if not bits and not values:
            raise ValueError("writes nothing: give bits (ok, ng, toggle, pulse) or values (counter, score, rectangles)")
        owner: dict[tuple[int, int], str] = {}
        for name, place in bits.items():
            key = (place.byte, place.bit)
            if key in owner:
                raise ValueError(f"DBX{place.byte}.{place.bit} is used twice ({owner[key]} and {name})")
            owner[key] = name
        taken: dict[int, str] = {}  # byte -> what writes it
        for name, place in bits.items():
            taken.setdefault(place.byte, name)
        for name, (first, size) in values.items():
            for byte in range(first, first + size):
                if byte in taken:
                    raise ValueError(f"byte {byte} is used twice ({taken[byte]} and {name})")
                taken[byte] = name
        if self.pulse is not None and 2 * self.pulse.ms >= self.timeout_s * 1000:
            raise ValueError(f"pulse.ms {self.pulse.ms} needs timeout_s above {2 * self.pulse.ms / 1000:g} s "
                             "(a pulse is set, then reset, then kept reset as long)")
        return self


def value_bytes(settings: S7Settings, message: Message) -> dict[int, int]:
    """Each value byte the message sets, by its offset in the DB (big-endian, as S7 stores them)."""
    found: dict[int, int] = {}

    def put(first: int, data: bytes) -> None:
        found.update({first + index: byte for index, byte in enumerate(data)})

    def integer(place: S7Int, value: int) -> bytes:
        return struct.pack(">H", value % 65536) if place.type == "INT" else struct.pack(">I", value % 2**32)

    if settings.counter is not None:
        put(settings.counter.byte, integer(settings.counter, message.counter))
    if settings.score is not None:
        score = message.score if message.score is not None and math.isfinite(message.score) else 0.0
        put(settings.score.byte, struct.pack(">f", score))
    if settings.rectangles is not None:
        put(settings.rectangles.byte, integer(settings.rectangles,
                                              min(message.rectangles, 32767 if settings.rectangles.type == "INT"
                                                  else 2**31 - 1)))
    return found


def runs(values: dict[int, int]) -> list[tuple[int, bytearray]]:
    found: list[tuple[int, bytearray]] = []
    for offset in sorted(values):
        if found and found[-1][0] + len(found[-1][1]) == offset:
            found[-1][1].append(values[offset])
        else:
            found.append((offset, bytearray([values[offset]])))
    return found


class S7Output(Output[S7Settings]):
    settings_model = S7Settings

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.client: Any = None  # snap7.Client once connected
        self.lock = threading.Lock()  # one call at a time on the client (the pulse reset runs apart)
        pulse = self.settings.pulse
        self.pulse = None if pulse is None else Pulse(
            pulse.ms, lambda: asyncio.to_thread(self._write_bits, {(pulse.byte, pulse.bit): False}))

    async def connect(self) -> None:
        import snap7

        settings = self.settings
        host = resolved(settings.host)

        def connect() -> Any:
            client = snap7.Client()
            client.connect(host, settings.rack, settings.slot, settings.port)
            connection = getattr(client, "connection", None)
            if connection is not None and getattr(connection, "socket", None) is not None:
                connection.timeout = settings.timeout_s
                connection.socket.settimeout(settings.timeout_s)
            return client

        self.client = await asyncio.to_thread(connect)
        if self.pulse is not None:
            await self.pulse.reset()

    async def send(self, message: Message) -> None:
        if self.pulse is not None:
            await self.pulse.ready()
        await asyncio.to_thread(self._write_message, message)
        if self.pulse is not None:
            self.pulse.set()

    def _write_message(self, message: Message) -> None:
        settings = self.settings
        for first, data in runs(value_bytes(settings, message)):
            self._call("db_write", settings.db, first, data)
        result: dict[tuple[int, int], bool | None] = {}
        if settings.ok is not None:
            result[(settings.ok.byte, settings.ok.bit)] = message.result
        if settings.ng is not None:
            result[(settings.ng.byte, settings.ng.bit)] = not message.result
        handshake: dict[tuple[int, int], bool | None] = {}
        if settings.toggle is not None:
            handshake[(settings.toggle.byte, settings.toggle.bit)] = None  # None: flip what the PLC has
        if settings.pulse is not None:
            handshake[(settings.pulse.byte, settings.pulse.bit)] = True
        handshake_bytes = {byte for byte, _ in handshake}
        self._write_bits({key: value for key, value in result.items() if key[0] not in handshake_bytes})
        self._write_bits({**{key: value for key, value in result.items() if key[0] in handshake_bytes},
                          **handshake})

    def _write_bits(self, bits: dict[tuple[int, int], bool | None]) -> None:
        """Set, reset or (None) flip bits, one read and one write per byte."""
        for byte in sorted({byte for byte, _ in bits}):
            value = self._call("db_read", self.settings.db, byte, 1)[0]
            for (where, bit), wanted in bits.items():
                if where == byte:
                    on = not value & (1 << bit) if wanted is None else wanted
                    value = value | (1 << bit) if on else value & ~(1 << bit)
            self._call("db_write", self.settings.db, byte, bytearray([value]))

    def _call(self, name: str, *args: Any) -> Any:
        with self.lock:
            client = self.client
            if client is None:
                raise ConnectionError("not connected to the PLC")
            return getattr(client, name)(*args)

    async def close(self) -> None:
        if self.pulse is not None:
            await self.pulse.settle()
        client, self.client = self.client, None
        if client is not None:
            try:
                await asyncio.to_thread(client.disconnect)
            except Exception:  # noqa: BLE001 - closing never raises
                pass
