"""The TCP line output against a real TCP peer on loopback: templated lines in order, a dead peer that never
delays the answer, the backlog delivered in order when it comes back, and the counts in /metrics and /health."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from appliance.errors import ConfigError
from appliance.outputs.base import Message
from appliance.outputs.template import Template
from appliance.project import Project
from tests.conftest import free_port, start_server, wait_until_sent, write_project
from tests.outputs import FLOW, VERDICT, analyse

# NG when the caller's data says so: the verdict of each frame is chosen by the test.


class Peer:
    """A line-reading TCP server (a PLC's or MES's socket) that can be stopped and started on the same port."""

    def __init__(self, port: int):
        self.port = port
        self.lines: list[str] = []
        self.listener: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        self.thread = threading.Thread(target=self._serve, args=(self.listener,), daemon=True)
        self.thread.start()

    def _serve(self, listener: socket.socket) -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        buffer = b""
        with connection:
            while chunk := connection.recv(65536):
                buffer += chunk
                *done, buffer = buffer.split(b"\n")
                self.lines += [line.decode() for line in done]

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        self.listener = None

    def wait_for(self, count: int, seconds: float = 20) -> list[str]:
        deadline = time.monotonic() + seconds
        while len(self.lines) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.lines


@pytest.fixture
def peer() -> Iterator[Peer]:
    started = Peer(free_port())
    started.start()
    yield started
    started.stop()


def test_each_inspection_is_one_templated_line_in_order(tmp_path, peer):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "tcp", "host": "127.0.0.1", "port": peer.port, "template": "$verdict;$ok;$request_id;$counter"}])
    server = start_server(project)
    try:
        for index, verdict in enumerate(["ok", "ng", "ok", "ng", "ng"]):
            assert analyse(server.url, verdict, f"part-{index}").status_code == 200
        assert peer.wait_for(5) == ["OK;1;part-0;1", "NG;0;part-1;2", "OK;1;part-2;3", "NG;0;part-3;4",
                                    "NG;0;part-4;5"]
        health = wait_until_sent(server, "tcp-0", 5)
        assert (health["connected"], health["sent"], health["dropped"]) == (True, 5, 0)
    finally:
        server.stop()


def test_every_placeholder_renders_as_documented():
    message = Message(result=False, request_id="part-9", timestamp=1767225600.25, project="line-3", score=0.1234567,
                      threshold=1.5, rectangles=2, labels=("spot", "scratch"), text="LOT 17", data="crate-4",
                      models=({"node": "surface", "model": "parts", "version": "3"},), source="pekat", counter=41)
    line = Template("$result|$ok|$verdict|${score}|$threshold|$rectangles|$labels|$text|$data|$models|$source|"
                    "$counter|$project|$request_id|$timestamp|$$5").render(message)
    assert line == ("false|0|NG|0.123457|1.5|2|spot,scratch|LOT 17|crate-4|parts:3|pekat|41|line-3|part-9|"
                    "1767225600.25|$5")
    assert json.loads(Template("$json").render(message)) == {
        "result": False, "request_id": "part-9", "timestamp": 1767225600.25, "project": "line-3", "score": 0.1234567,
        "threshold": 1.5, "rectangles": 2, "labels": ["spot", "scratch"], "text": "LOT 17", "data": "crate-4",
        "models": [{"node": "surface", "model": "parts", "version": "3"}], "source": "pekat", "counter": 41}
    unscored = Message(result=True, request_id="r", timestamp=0.0, project="p")
    assert Template("[$score][$threshold][$labels] no placeholder").render(unscored) == "[][][] no placeholder"
    assert Template("a constant line").render(unscored) == "a constant line"


def test_a_dead_peer_never_delays_the_answer_and_gets_the_backlog_in_order(tmp_path):
    port = free_port()
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "tcp", "name": "plc", "host": "127.0.0.1", "port": port, "template": "$request_id"}])
    server = start_server(project)
    peer = Peer(port)
    try:
        for index in range(20):
            assert analyse(server.url, "ok", f"early-{index}").status_code == 200
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="failed",output="plc"}' in metrics
        peer.start()  # the PLC comes back: the output reconnects (backoff at most 30 s; here within seconds)
        assert peer.wait_for(20, seconds=40) == [f"early-{index}" for index in range(20)]
        assert analyse(server.url, "ng", "late").status_code == 200
        assert peer.wait_for(21)[-1] == "late"
        wait_until_sent(server, "plc", 21)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="plc"} 21.0' in metrics
    finally:
        server.stop()
        peer.stop()


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "tcp", "name": "plc", "host": "127.0.0.1", "port": free_port(), "queue": 3}])
    server = start_server(project)
    try:
        for index in range(10):
            assert analyse(server.url, "ok", f"p-{index}").status_code == 200
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["plc"]
        # One message is being tried, three wait: the other six were dropped.
        assert health["dropped"] == 6 and health["queued"] == 3 and health["connected"] is False
    finally:
        server.stop()


def test_check_locates_a_bad_template_an_unknown_kind_and_a_missing_environment_variable(tmp_path):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "tcp", "host": "127.0.0.1", "port": 9, "template": "$verdict $scroe"},
        {"type": "carrier-pigeon"},
        {"type": "tcp", "host": {"env": "NO_SUCH_APPLIANCE_HOST"}, "port": 9}])
    with pytest.raises(ConfigError) as refused:
        Project.load(project)
    problems = [problem.split(" ", 1)[1] for problem in refused.value.problems]
    assert problems[0].startswith("outputs[0].template: unknown placeholder $scroe; known: $result, ")
    assert problems[1].startswith("outputs[1].type: unknown output type 'carrier-pigeon'; known: tcp")
    assert problems[2] == ("outputs[2].host: environment variable NO_SUCH_APPLIANCE_HOST is not set and has "
                           "no default")
