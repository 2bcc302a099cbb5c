"""What every output shares: its settings, the message it carries, and the delivery loop.

An output never delays or fails an inspection: the serving core hands each finished inspection to `Output.offer`,
which only puts a message on the output's bounded queue (a full queue drops the message and counts it). One task
per output sends the queue in order; a send that fails closes the connection, waits (backoff from 0.5 s doubling
to 30 s) and reconnects, then sends the same message again, so a PLC that was away gets the results in order
once it is back, up to the queue's size.

The delivery task takes what is queued in one go (`send_batch`: a kind that can, such as the TCP line, sends a
backlog in one write) and creates no task per message (`asyncio.timeout`, not `wait_for`): on the 2 shared cores of
bench/outputs.py every wake-up and task of the event loop is CPU the inspection does not get.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

log = logging.getLogger("appliance.outputs")


class EnvValue(BaseModel):
    """A value taken from the environment when the project loads: `{env: NAME, default: "..."}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str = Field(min_length=1)
    default: str | None = None

    def resolve(self) -> str:
        value = os.environ.get(self.env, self.default)
        if value is None:
            raise ValueError(f"environment variable {self.env} is not set and has no default")
        return value


def resolved(value: str | EnvValue) -> str:
    return value.resolve() if isinstance(value, EnvValue) else value


class OutputSettings(BaseModel):
    """Settings every output has; each kind adds its own fields and a `type: Literal["kind"]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="for metrics and logs; default: "
                             "the type and its position, e.g. mqtt-0")
    queue: PositiveInt = Field(1000, le=100_000, description="messages waiting at most; more are dropped")
    timeout_s: float = Field(5.0, gt=0, le=300, description="connecting or sending one message at most")


class LoginSettings(BaseModel):
    """A user name and its password for outputs that log in; the password never stands in project.yaml itself."""

    username: str | EnvValue | None = None
    password: EnvValue | None = Field(None, description="from the environment only: {env: NAME}; or password_file")
    password_file: str | None = Field(None, description="an absolute path whose content is the password (e.g. a "
                                      "systemd credential)")

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file: choose one")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        if self.password_file is not None and not Path(self.password_file).is_absolute():
            raise ValueError("password_file: write an absolute path")
        return self

    def login(self) -> tuple[str | None, str | None]:
        """(username, password) read now: a password file may be rotated while the appliance runs."""
        if self.username is None:
            return None, None
        if self.password is not None:
            return resolved(self.username), self.password.resolve()
        if self.password_file is not None:
            return resolved(self.username), Path(self.password_file).read_text().rstrip("\r\n")
        return resolved(self.username), None


@dataclass(frozen=True)
class Message:
    """What an output can carry about one inspection."""

    result: bool
    request_id: str
    timestamp: float  # seconds since the epoch, when the inspection finished
    project: str
    score: float | None = None
    threshold: float | None = None
    rectangles: int = 0
    labels: tuple[str, ...] = ()
    text: str = ""
    data: str = ""
    models: tuple[dict[str, Any], ...] = ()
    source: str = "http"  # the route's API, or the source that acquired the frame
    counter: int = 0  # inspections since start, across all outputs (mod nothing: outputs wrap it as they need)

    def as_dict(self) -> dict[str, Any]:
        return {"result": self.result, "request_id": self.request_id, "timestamp": self.timestamp,
                "project": self.project, "score": self.score, "threshold": self.threshold,
                "rectangles": self.rectangles, "labels": list(self.labels), "text": self.text, "data": self.data,
                "models": [dict(model) for model in self.models], "source": self.source, "counter": self.counter}

    @cached_property
    def json(self) -> str:
        """The whole message as compact JSON, made once however many outputs carry it (MQTT, TCP, webhook)."""
        return json.dumps(self.as_dict(), separators=(",", ":"))


class Pulse:
    """A "new result" bit a PLC latches: set with each result, reset `ms` later, then kept reset as long before it is
    set again, so a PLC scanning slower than the line still sees every edge. `reset` writes the bit low."""

    def __init__(self, ms: int, reset: Callable[[], Awaitable[None]]):
        self.seconds = ms / 1000
        self.write_low = reset
        self.task: asyncio.Task[None] | None = None
        self.low_until = 0.0  # monotonic time before which the bit stays reset

    async def reset(self) -> None:
        """Write the bit low now (also on connect: a pulse left set by a connection lost mid-pulse)."""
        await self.write_low()
        self.low_until = time.monotonic() + self.seconds

    async def ready(self) -> None:
        """Before a new result: the previous pulse reset, then kept reset as long."""
        task, self.task = self.task, None
        if task is not None:
            await task
        await asyncio.sleep(max(0.0, self.low_until - time.monotonic()))

    def set(self) -> None:
        """The bit was just written high with a result: reset it `ms` from now."""
        self.task = asyncio.create_task(self._reset_at(time.monotonic() + self.seconds))

    async def _reset_at(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        await self.reset()

    async def settle(self) -> None:
        """On close: let a pulse end (or fail fast on a lost connection) rather than stay set; never raises."""
        task, self.task = self.task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, self.seconds + 1)
            except Exception:  # noqa: BLE001 - closing never raises
                pass


class OutputMetrics(Protocol):
    """What an output reports (the server's Metrics implements it)."""

    def output_message(self, output: str, outcome: str) -> None: ...

    def output_queue(self, output: str, waiting: int) -> None: ...


SettingsT = TypeVar("SettingsT", bound=OutputSettings)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# Messages a kind's `send_batch` carries at most at once: a backlog after a reconnect goes in slices, so a failure
# sends again (at least once) a bounded number of messages.
BATCH_MAX = 100


@dataclass
class _State:
    # Not sent yet, in order; the front one is being tried while `holding` (it does not count against `queue`).
    pending: deque[Message] = field(default_factory=deque)
    holding: bool = False
    wake: asyncio.Event | None = None  # set by `offer`: there is something to send
    task: asyncio.Task | None = None
    connected: bool = False
    last_error: str | None = None
    sent: int = 0
    dropped: int = 0
    failed: int = 0
    reported: int = 0  # the queue depth last given to the metrics
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def waiting(self) -> int:
        return len(self.pending) - self.holding


class Output(Generic[SettingsT]):
    """One configured output. Subclasses implement `connect`, `send` and `close` (and `send_batch` when the
    protocol can carry several messages at once); all run on the event loop (a blocking library call goes to a
    thread with `asyncio.to_thread`)."""

    settings_model: ClassVar[type[OutputSettings]]

    def __init__(self, name: str, settings: SettingsT, metrics: OutputMetrics | None = None):
        self.name = name
        self.settings = settings
        self.metrics = metrics
        self.state = _State()

    # --- what a kind implements ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection (called before the first send and after a failure)."""

    async def send(self, message: Message) -> None:
        raise NotImplementedError

    async def send_batch(self, pending: deque[Message]) -> None:
        """Send the messages at the front of `pending`, in order, calling `self.delivered(pending)` for each as soon
        as its peer has it (that takes it off the front); raise on a failure, what is left is sent again after the
        reconnect. This default sends the front message within `timeout_s`; a kind that can carry several at
        once (the TCP line: one write) overrides it. New messages may be appended while it awaits."""
        async with asyncio.timeout(self.settings.timeout_s):
            await self.send(pending[0])
        self.delivered(pending)

    async def close(self) -> None:
        """Close the connection, if any; never raises."""

    # --- the delivery loop -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.state.wake = asyncio.Event()
        if self.metrics is not None:
            self.metrics.output_queue(self.name, 0)  # the series exists from the start
        self.state.task = asyncio.create_task(self._deliver(), name=f"output {self.name}")

    def offer(self, message: Message) -> None:
        """From the event loop, never blocks: queue the message, or drop it when the queue is full."""
        state = self.state
        if state.wake is None:
            return
        if state.waiting >= self.settings.queue:
            state.dropped += 1
            self._count("dropped")
            return
        state.pending.append(message)
        state.wake.set()
        if state.holding:  # it waits behind the one being sent; an idle output sends it at once: no gauge change
            self._report_queue()

    def delivered(self, pending: deque[Message], count: int = 1) -> None:
        """The peer has the first `count` messages of `pending`: count them sent and take them off."""
        for _ in range(count):
            pending.popleft()
            self._count("sent")
        self.state.sent += count
        if self.state.reported:  # a backlog draining
            self._report_queue()

    async def stop(self, flush_s: float = 2.0) -> None:
        """Send what is queued for up to ``flush_s``, then stop and close."""
        task = self.state.task
        if task is not None and not task.done():
            deadline = time.monotonic() + flush_s
            while self.state.pending and time.monotonic() < deadline and self.state.connected:
                await asyncio.sleep(0.02)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.close()

    def _report_queue(self) -> None:
        # Only changes: with one message at a time (the usual line) the gauge stays at 0 and costs nothing.
        waiting = self.state.waiting
        if self.metrics is not None and waiting != self.state.reported:
            self.metrics.output_queue(self.name, waiting)
        self.state.reported = waiting

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.output_message(self.name, outcome)

    async def _deliver(self) -> None:
        state = self.state
        assert state.wake is not None
        pending, wake = state.pending, state.wake
        backoff = BACKOFF_FIRST_S
        while True:
            if not pending:
                state.holding = False
                if state.reported:
                    self._report_queue()
                wake.clear()
                await wake.wait()
                continue
            state.holding = True
            try:
                if not state.connected:
                    async with asyncio.timeout(self.settings.timeout_s):
                        await self.connect()
                    state.connected = True
                    if state.last_error is not None:
                        log.info("output %s: connected again", self.name)
                # Everything queued goes before the task sleeps again: one wake-up for a backlog.
                while pending:
                    await self.send_batch(pending)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a peer's failure is counted and retried, never raised
                reason = f"{type(error).__name__}: {str(error)[:200]}"
                if reason != state.last_error:
                    log.warning("output %s: %s; retrying in %.1f s", self.name, reason, backoff)
                state.last_error = reason
                state.failed += 1
                self._count("failed")
                state.connected = False
                await self.close()
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            state.last_error = None
            backoff = BACKOFF_FIRST_S

    def health(self) -> dict[str, Any]:
        return {"type": self.settings.type, "connected": self.state.connected, "sent": self.state.sent,
                "dropped": self.state.dropped, "failed": self.state.failed, "last_error": self.state.last_error,
                "queued": self.state.waiting}
