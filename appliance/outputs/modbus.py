"""modbus: the verdict as coils and holding registers of a Modbus TCP server (a PLC), so the PLC can latch it.

After each inspection the output writes, in this order: the mapped holding registers (counter, score x 1000,
rectangles), then the result coils (OK, NG), then the "new result" handshake: a toggle coil that flips (read from
the PLC on each connect, so a PLC that restarted still sees a change) and/or a pulse coil set for `ms` and reset.
Contiguous addresses go in one request (FC16 for registers, FC15 for coils), so with the default-style layout
`coils: {ok: 0, ng: 1, toggle: 2}` the result and its handshake change in a single write.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from appliance.outputs.base import EnvValue, Message, Output, OutputSettings, Pulse, resolved

URL = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s\[\]]+):(?P<port>[0-9]{1,5})$")


def parse_url(url: str) -> tuple[str, int]:
    """`tcp://host:port` as (host, port); ValueError with the expected form otherwise."""
    match = URL.match(url)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"{url!r} is not a Modbus TCP address; expected tcp://host:port, e.g. tcp://192.168.0.10:502")
    return match["host"].strip("[]"), int(match["port"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModbusCoils(_Strict):
    ok: int | None = Field(default=None, ge=0, le=65535, description="set when the part is OK, reset when NG")
    ng: int | None = Field(default=None, ge=0, le=65535, description="set when the part is NG, reset when OK")
    toggle: int | None = Field(default=None, ge=0, le=65535, description="flips with each result (the 'new result' bit)")


class ModbusPulse(_Strict):
    coil: int = Field(ge=0, le=65535)
    ms: int = Field(200, ge=1, le=60_000, description="how long the coil stays set; it then stays reset as long")


class ModbusRegisters(_Strict):
    counter: int | None = Field(default=None, ge=0, le=65535, description="inspections counted, mod 65536")
    score_x1000: int | None = Field(default=None, ge=0, le=65535, description="round(score x 1000), clipped to 0-65535")
    rectangles: int | None = Field(default=None, ge=0, le=65535, description="rectangles found, at most 65535")


class ModbusSettings(OutputSettings):
    type: Literal["modbus"]
    url: str | EnvValue = Field(description="tcp://host:port of the Modbus TCP server (the PLC)")
    unit: int = Field(1, ge=0, le=255, description="the slave (unit) id")
    coils: ModbusCoils = ModbusCoils()
    pulse: ModbusPulse | None = None
    registers: ModbusRegisters = ModbusRegisters()

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | EnvValue) -> str | EnvValue:
        if isinstance(value, str):
            parse_url(value)
        elif value.default is not None:
            parse_url(value.default)
        return value

    @model_validator(mode="after")
    def _addresses(self) -> ModbusSettings:
        coils = {name: address for name, address in self.coils.model_dump().items() if address is not None}
        if self.pulse is not None:
            coils["pulse.coil"] = self.pulse.coil
        registers = {name: address for name, address in self.registers.model_dump().items() if address is not None}
        if not coils and not registers:
            raise ValueError("maps nothing: give coils (ok, ng, toggle), a pulse coil or registers "
                             "(counter, score_x1000, rectangles)")
        for space, used in (("coil", coils), ("holding register", registers)):
            seen: dict[int, str] = {}
            for name, address in used.items():
                if address in seen:
                    raise ValueError(f"{space} {address} is used twice ({seen[address]} and {name})")
                seen[address] = name
        if self.pulse is not None and 2 * self.pulse.ms >= self.timeout_s * 1000:
            raise ValueError(f"pulse.ms {self.pulse.ms} needs timeout_s above {2 * self.pulse.ms / 1000:g} s "
                             "(a pulse is set, then reset, then kept reset as long)")
        return self


def runs(values: dict[int, Any]) -> list[tuple[int, list[Any]]]:
    """Addresses and their values as (first address, values) runs of contiguous addresses."""
    found: list[tuple[int, list[Any]]] = []
    for address in sorted(values):
        if found and found[-1][0] + len(found[-1][1]) == address:
            found[-1][1].append(values[address])
        else:
            found.append((address, [values[address]]))
    return found


def register_values(settings: ModbusRegisters, message: Message) -> dict[int, int]:
    values: dict[int, int] = {}
    if settings.counter is not None:
        values[settings.counter] = message.counter % 65536
    if settings.score_x1000 is not None:
        score = message.score if message.score is not None and message.score == message.score else 0.0
        values[settings.score_x1000] = min(65535, max(0, round(score * 1000)))
    if settings.rectangles is not None:
        values[settings.rectangles] = min(65535, message.rectangles)
    return values


class ModbusOutput(Output[ModbusSettings]):
    settings_model = ModbusSettings

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.client: Any = None  # pymodbus.client.AsyncModbusTcpClient once connected
        self.toggle = False  # the toggle coil's value at the PLC
        pulse = self.settings.pulse
        self.pulse = None if pulse is None else Pulse(pulse.ms, lambda: self._write_coils({pulse.coil: False}))

    async def connect(self) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        host, port = parse_url(resolved(self.settings.url))
        # The delivery loop reconnects with its own backoff: pymodbus must neither reconnect nor retry by itself.
        client = AsyncModbusTcpClient(host, port=port, timeout=self.settings.timeout_s, retries=0,
                                      reconnect_delay=0)
        self.client = client
        if not await client.connect():
            raise ConnectionError(f"cannot connect to the Modbus TCP server at {host}:{port}")
        if self.settings.coils.toggle is not None:
            answer = await client.read_coils(self.settings.coils.toggle, count=1, device_id=self.settings.unit)
            self._check(answer, f"reading the toggle coil {self.settings.coils.toggle}")
            self.toggle = bool(answer.bits[0])
        if self.pulse is not None:
            await self.pulse.reset()

    async def send(self, message: Message) -> None:
        settings = self.settings
        if self.pulse is not None:
            await self.pulse.ready()
        registers = register_values(settings.registers, message)
        for first, values in runs(registers):
            answer = await self.client.write_registers(first, values, device_id=settings.unit)
            self._check(answer, f"writing holding registers {first}-{first + len(values) - 1}")
        result: dict[int, bool] = {}
        if settings.coils.ok is not None:
            result[settings.coils.ok] = message.result
        if settings.coils.ng is not None:
            result[settings.coils.ng] = not message.result
        handshake: dict[int, bool] = {}
        if settings.coils.toggle is not None:
            handshake[settings.coils.toggle] = not self.toggle
        if settings.pulse is not None:
            handshake[settings.pulse.coil] = True
        together = runs({**result, **handshake})
        if len(together) == 1:  # the result and its handshake in one request
            await self._write_coils({**result, **handshake})
        else:  # the result first, the handshake last, so the PLC never sees a new-result bit before its result
            await self._write_coils(result)
            await self._write_coils(handshake)
        if settings.coils.toggle is not None:
            self.toggle = not self.toggle
        if self.pulse is not None:
            self.pulse.set()

    async def _write_coils(self, coils: dict[int, bool]) -> None:
        for first, values in runs(coils):
            if len(values) == 1:
                answer = await self.client.write_coil(first, values[0], device_id=self.settings.unit)
            else:
                answer = await self.client.write_coils(first, values, device_id=self.settings.unit)
            self._check(answer, f"writing coils {first}-{first + len(values) - 1}")

    @staticmethod
    def _check(answer: Any, what: str) -> None:
        if answer.isError():
            raise ConnectionError(f"the Modbus server refused {what}: {answer}")

    async def close(self) -> None:
        if self.pulse is not None:
            await self.pulse.settle()
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing never raises
                pass
