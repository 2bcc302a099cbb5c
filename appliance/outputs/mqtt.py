"""mqtt: one message per inspection published to an MQTT broker (aiomqtt, on the event loop; no thread)."""

from __future__ import annotations

import asyncio
import json
import math
import ssl
from typing import Any, Literal
from urllib.parse import urlsplit

import aiomqtt
from pydantic import Field, field_validator, model_validator

from appliance.outputs.base import EnvValue, LoginSettings, Message, Output, OutputSettings, resolved
from appliance.outputs.template import FIELDS, check_template, render

SCHEMES = {"mqtt": 1883, "mqtts": 8883}


def broker_address(url: str) -> tuple[str, int, bool]:
    """`mqtt://host:port` (or `mqtts://` for TLS) -> host, port, tls; ValueError on anything else."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"broker url {url!r}: write mqtt://host:port (or mqtts://host:port for TLS)")
    if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
        raise ValueError(f"broker url {url!r}: only mqtt://host:port; the user and password are settings of their own")
    try:
        port = parts.port or SCHEMES[parts.scheme]
    except ValueError as error:
        raise ValueError(f"broker url {url!r}: {error}") from None
    return parts.hostname, port, parts.scheme == "mqtts"


class MqttSettings(OutputSettings, LoginSettings):
    type: Literal["mqtt"]
    url: str | EnvValue = Field(description="the broker, mqtt://host:port (mqtts:// for TLS)")
    topic: str = Field("appliance/$project/result", description="where to publish; may hold placeholders such as "
                       "$project or $verdict")
    template: str | None = Field(None, description="the payload as text; default: the message as JSON")
    fields: tuple[str, ...] | None = Field(None, description="with the JSON payload: only these fields")
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    client_id: str | None = Field(None, max_length=128, description="default: one chosen by the client library")
    keepalive_s: int = Field(60, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | EnvValue) -> str | EnvValue:
        if isinstance(value, str):
            broker_address(value)
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not value or "+" in value or "#" in value or "\0" in value:
            raise ValueError("a topic to publish to is not empty and has no wildcard (+ or #)")
        return check_template(value)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return None if value is None else check_template(value)

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        unknown = [name for name in value or () if name not in FIELDS]
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}; known: {', '.join(FIELDS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttSettings:
        if self.template is not None and self.fields is not None:
            raise ValueError("template and fields: choose one (fields select what the JSON payload carries)")
        if isinstance(self.url, EnvValue):
            try:
                url = self.url.resolve()
            except ValueError:
                return self  # the loader reports the missing variable with its place
            broker_address(url)
        return self


class _Client(aiomqtt.Client):
    """aiomqtt's client, but a publish made on the event loop is written out on the loop's next turn.

    aiomqtt asks paho to tell it when a packet waits, and then wakes the loop through its self-pipe
    (`call_soon_threadsafe`, because paho may ask from the thread that connects) to watch the socket for
    writability, and stops watching once the packet is out: per message a self-pipe write and read, two epoll
    changes and two more turns of the loop. Measured with bench/outputs.py, that was a fifth of what a QoS 1
    publish cost the appliance. A socket whose buffer is full is still watched as aiomqtt does."""

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # paho's connect, on aiomqtt's executor thread
            running = None
        if running is not self._loop:
            super()._on_socket_register_write(client, userdata, sock)
            return
        self._loop.call_soon(self._write_now, client, userdata, sock)

    def _write_now(self, client: Any, userdata: Any, sock: Any) -> None:
        try:
            client.loop_write()
        except Exception as error:  # noqa: BLE001 - as aiomqtt's writer: a broken connection ends the client
            if not self._disconnected.done():
                self._disconnected.set_exception(error)
            return
        if client.want_write() and client.socket() is not None:  # paho counts the socket as watched: watch it
            super()._on_socket_register_write(client, userdata, sock)


class MqttOutput(Output[MqttSettings]):
    settings_model = MqttSettings
    client: aiomqtt.Client | None = None

    def payload(self, message: Message) -> str:
        if self.settings.template is not None:
            return render(self.settings.template, message)
        if self.settings.fields is not None:
            values = message.as_dict()
            return json.dumps({name: values[name] for name in self.settings.fields}, separators=(",", ":"))
        return message.json  # made once for every output that carries it

    async def connect(self) -> None:
        host, port, tls = broker_address(resolved(self.settings.url))
        username, password = self.settings.login()
        client = _Client(host, port, username=username, password=password, identifier=self.settings.client_id,
                         keepalive=self.settings.keepalive_s, timeout=self.settings.timeout_s,
                         tls_context=ssl.create_default_context() if tls else None)
        await client.__aenter__()
        self.client = client

    async def send(self, message: Message) -> None:
        assert self.client is not None
        # aiomqtt leaves a QoS 1/2 publish waiting for its acknowledgement when the broker goes away: the
        # disconnection cuts the wait short at once instead of at the timeout. Without a task per message: the
        # publish is awaited here (timeout=inf: aiomqtt then wraps it in no task of its own either) and the
        # disconnection expires a timeout around it.
        disconnected: asyncio.Future[None] | None = getattr(self.client, "_disconnected", None)
        publish = self.client.publish(render(self.settings.topic, message), self.payload(message),
                                      qos=self.settings.qos, retain=self.settings.retain, timeout=math.inf)
        if disconnected is None:
            await publish
            return
        if disconnected.done():
            publish.close()
            raise ConnectionError("the broker closed the connection")
        waiting = True

        def cut_short(_: asyncio.Future[None]) -> None:
            if waiting:
                wait.reschedule(-1.0)  # expires now

        try:
            async with asyncio.timeout(None) as wait:
                disconnected.add_done_callback(cut_short)
                try:
                    await publish
                finally:
                    waiting = False
                    disconnected.remove_done_callback(cut_short)
        except TimeoutError:
            if disconnected.done():
                raise ConnectionError("the broker closed the connection") from None
            raise

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.__aexit__(None, None, None), 1.0)
            except Exception:  # noqa: BLE001 - closing a broken connection may fail
                pass
