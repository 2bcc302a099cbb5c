"""The S7 output against python-snap7's own server (pure Python, in this process) on loopback: the DB bytes and
bits after OK and NG frames, in order; a dead PLC that never delays the answer and gets the backlog in order."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import snap7
from snap7.type import SrvArea

from appliance.errors import ConfigError
from appliance.project import Project
from tests.conftest import free_port, start_server, wait_until_sent, write_project
from tests.outputs import FLOW, SCORED_VERDICT, analyse

WRITE = 0x00040000  # snap7's "data write" server event
LAYOUT = {"db": 7, "ok": {"byte": 0, "bit": 0}, "ng": {"byte": 0, "bit": 1}, "toggle": {"byte": 0, "bit": 2},
          "counter": {"byte": 2, "type": "INT"}, "score": {"byte": 4}}


class Plc:
    """snap7's server with DB 7 (16 bytes); after each write it keeps a copy of the DB, in order."""

    def __init__(self, port: int):
        self.port = port
        self.db = bytearray(16)
        self.db[0] = 0b1000_0000  # a bit the PLC program owns in the same byte: left alone
        self.after_writes: list[bytes] = []
        self.lock = threading.Lock()
        self.server: snap7.Server | None = None

    def start(self) -> None:
        self.server = snap7.Server(log=False)
        self.server.register_area(SrvArea.DB, 7, self.db)
        self.server.set_events_callback(self._event)
        self.server.start(tcp_port=self.port)

    def _event(self, event) -> None:
        if event.EvtCode == WRITE:
            with self.lock:
                self.after_writes.append(bytes(self.db))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server.destroy()
        self.server = None

    def wait_for(self, predicate, seconds: float = 20) -> list[bytes]:
        deadline = time.monotonic() + seconds
        while not predicate(self.after_writes) and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.after_writes)


@pytest.fixture
def plc() -> Iterator[Plc]:
    started = Plc(free_port())
    started.start()
    yield started
    started.stop()


def decoded(db: bytes) -> tuple[int, int, float]:
    """(bits byte 0, counter INT at 2, score REAL at 4)."""
    return db[0], struct.unpack(">h", db[2:4])[0], struct.unpack(">f", db[4:8])[0]


def bits_written(after_writes: list[bytes]) -> list[tuple[int, int, float]]:
    """The DB after each inspection's second write (byte 0: the result and toggle bits, written last)."""
    assert len(after_writes) % 2 == 0, len(after_writes)
    return [decoded(db) for db in after_writes[1::2]]


def test_ok_and_ng_frames_write_the_bits_counter_and_score_in_order(tmp_path, plc):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": SCORED_VERDICT}, outputs=[
        {"type": "s7", "host": "127.0.0.1", "port": plc.port, **LAYOUT}])
    server = start_server(project)
    try:
        for index, verdict in enumerate(["ok", "ng", "ng", "ok"]):
            assert analyse(server.url, verdict, f"part-{index}").status_code == 200
        after = plc.wait_for(lambda writes: len(writes) >= 8)
        # Per inspection: the values (counter, score: one write of bytes 2-7), then byte 0 (OK, NG, toggle).
        assert len(after) == 8
        assert [decoded(db) for db in after] == [
            (0x80, 1, 0.5), (0x80 | 0b101, 1, 0.5),
            (0x80 | 0b101, 2, 0.125), (0x80 | 0b010, 2, 0.125),
            (0x80 | 0b010, 3, 0.125), (0x80 | 0b110, 3, 0.125),
            (0x80 | 0b110, 4, 0.5), (0x80 | 0b001, 4, 0.5)]
        wait_until_sent(server, "s7-0", 4)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="s7-0"} 4.0' in metrics
    finally:
        server.stop()


def test_a_dead_plc_never_delays_the_answer_and_gets_the_backlog_in_order(tmp_path):
    port = free_port()
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": SCORED_VERDICT}, outputs=[
        {"type": "s7", "name": "plc", "host": "127.0.0.1", "port": port, **LAYOUT}])
    server = start_server(project)
    plc = Plc(port)
    try:
        for index in range(20):
            assert analyse(server.url, "ng" if index % 3 == 0 else "ok", f"early-{index}").status_code == 200
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["plc"]
        assert health["connected"] is False and health["failed"] >= 1
        plc.start()  # the PLC comes back
        after = plc.wait_for(lambda writes: len(writes) >= 40, seconds=40)
        results = bits_written(after)
        assert [counter for _, counter, _ in results] == list(range(1, 21))
        assert [bits & 0b11 for bits, _, _ in results] == [0b10 if i % 3 == 0 else 0b01 for i in range(20)]
        toggles = [bits >> 2 & 1 for bits, _, _ in results]
        assert toggles == [(i + 1) % 2 for i in range(20)]
        wait_until_sent(server, "plc", 20)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="plc"} 20.0' in metrics
    finally:
        server.stop()
        plc.stop()


def test_check_locates_a_bit_used_twice_overlapping_values_and_a_bad_bit(tmp_path):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": SCORED_VERDICT}, outputs=[
        {"type": "s7", "host": "plc", "db": 1, "ok": {"byte": 0, "bit": 0}, "ng": {"byte": 0, "bit": 0}},
        {"type": "s7", "host": "plc", "db": 1, "counter": {"byte": 2, "type": "DINT"}, "score": {"byte": 4}},
        {"type": "s7", "host": "plc", "db": 1, "ok": {"byte": 0, "bit": 8}},
        {"type": "s7", "host": "plc", "db": 1}])
    with pytest.raises(ConfigError) as refused:
        Project.load(project)
    problems = [problem.split(" ", 1)[1] for problem in refused.value.problems]
    assert len(problems) == 4, problems
    assert problems[0].startswith("outputs[0]") and "DBX0.0 is used twice (ok and ng)" in problems[0]
    assert problems[1].startswith("outputs[1]") and "byte 4 is used twice (counter and score)" in problems[1]
    assert problems[2].startswith("outputs[2].ok.bit: ")
    assert problems[3].startswith("outputs[3]") and "writes nothing" in problems[3]
