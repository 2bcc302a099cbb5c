"""A real Mosquitto broker on a free loopback port, and a subscriber that records what it hears, for the MQTT tests
and the line-io project's test (Debian's `mosquitto` package; `make test-tools` installs it)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tests.conftest import free_port


class Broker:
    """`mosquitto -c conf` on 127.0.0.1:port; stop and start it again on the same port (its state persists)."""

    def __init__(self, folder: Path, port: int | None = None, users: dict[str, str] | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {folder}/",
                 f"log_dest file {folder}/mosquitto.log"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it becomes `mosquitto`, who may not write in the test's folder
        if users:
            passwords = folder / "passwords"
            passwords.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        (folder / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.folder / "mosquitto.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            try:
                probe.connect("127.0.0.1", self.port)
                probe.disconnect()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # mosquitto saves its persistent sessions on the way out
            self.process.wait(10)
        self.process = None


@dataclass
class Heard:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float  # time.monotonic() when the subscriber got it

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """paho-mqtt on its own thread, subscribed to `topic`; a fixed client id and a persistent session (QoS 1), so
    messages published while it is away are kept for it by the broker."""

    port: int
    topic: str = "#"
    client_id: str = "test-subscriber"
    messages: list[Heard] = field(default_factory=list)
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False)
        if self.username is not None:
            self.client.username_pw_set(self.username, self.password)
        self.client.on_connect = lambda client, *_: client.subscribe(self.topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _client, _data, message: self.messages.append(
            Heard(message.topic, message.payload, bool(message.retain), message.qos, time.monotonic()))

    def start(self) -> Subscriber:
        self.subscribed.clear()
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the subscriber did not subscribe"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_for(self, count: int, seconds: float = 20) -> list[Heard]:
        deadline = time.monotonic() + seconds
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return list(self.messages)
