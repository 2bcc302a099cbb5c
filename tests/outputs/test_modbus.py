"""The Modbus TCP output against pymodbus's own server on loopback (a subprocess that logs every write it gets):
coils and registers after OK and NG frames, in order; the toggle flipping; the counter mod 65536; the pulse length;
a dead PLC that never delays the answer and gets the backlog in order when it comes back; check's file:line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from pymodbus.client import ModbusTcpClient

from appliance.errors import ConfigError
from appliance.outputs.base import Message
from appliance.outputs.modbus import ModbusOutput, ModbusSettings
from appliance.project import Project
from tests.conftest import free_port, start_server, wait_until_sent, write_project
from tests.outputs import FLOW, SCORED_VERDICT, analyse

# The verdict and the score of each frame are chosen by the test (data "ng" or "ok", score from the request id).
FC_COIL, FC_COILS, FC_REGISTERS = 5, 15, 16

SERVER = textwrap.dedent("""
    import asyncio, json, sys, time
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def action(function_code, start, address, count, registers, values):
        if values is not None:  # a write: logged, then applied by the server
            print(json.dumps({"t": time.monotonic(), "fc": function_code, "address": address,
                              "values": [int(value) for value in values]}), flush=True)
        return None

    async def main(port):
        bits = [SimData(0, count=1000, values=False, datatype=DataType.BITS)]
        words = [SimData(0, count=1000, values=0, datatype=DataType.REGISTERS)]
        device = SimDevice(id=0, simdata=(bits, bits, words, words), action=action)
        server = ModbusTcpServer(device, address=("127.0.0.1", port))
        print(json.dumps({"ready": True}), flush=True)
        await server.serve_forever()

    asyncio.run(main(int(sys.argv[1])))
""")


class Plc:
    """pymodbus's TCP server in a subprocess, on a fixed port so that it can die and come back."""

    def __init__(self, port: int):
        self.port = port
        self.writes: list[dict] = []
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(self.port)], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout is not None
        assert json.loads(self.process.stdout.readline()) == {"ready": True}
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # listening yet?
            with ModbusTcpClient("127.0.0.1", port=self.port, timeout=1) as client:
                if client.connected:
                    return
            time.sleep(0.05)
        raise RuntimeError("the Modbus server did not listen")

    def _read(self, stream) -> None:
        for line in stream:
            self.writes.append(json.loads(line))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def wait_for(self, predicate, seconds: float = 20) -> list[dict]:
        deadline = time.monotonic() + seconds
        while not predicate(self.writes) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.writes

    def read(self, coils: int, registers: int) -> tuple[list[bool], list[int]]:
        with ModbusTcpClient("127.0.0.1", port=self.port, timeout=5) as client:
            bits = client.read_coils(0, count=coils, device_id=1).bits[:coils]
            words = client.read_holding_registers(0, count=registers, device_id=1).registers
        return bits, words


@pytest.fixture
def plc() -> Iterator[Plc]:
    started = Plc(free_port())
    started.start()
    yield started
    started.stop()


def modbus(port: int, **settings) -> dict:
    return {"type": "modbus", "url": f"tcp://127.0.0.1:{port}", "unit": 1, **settings}


def test_ok_and_ng_frames_set_the_result_coils_the_registers_and_flip_the_toggle_in_order(tmp_path, plc):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": SCORED_VERDICT}, outputs=[modbus(
        plc.port, coils={"ok": 0, "ng": 1, "toggle": 2}, registers={"counter": 0, "score_x1000": 1, "rectangles": 2})])
    server = start_server(project)
    try:
        verdicts = ["ok", "ng", "ng", "ok"]
        seen = []
        for index, verdict in enumerate(verdicts):
            assert analyse(server.url, verdict, f"part-{index}").status_code == 200
            # A PLC latching each result: it waits for the toggle to flip, then reads the bits and the counter.
            plc.wait_for(lambda writes, count=index + 1: sum(w["fc"] == FC_COILS for w in writes) == count)
            seen.append(plc.read(3, 3))
        assert seen == [([True, False, True], [1, 500, 0]), ([False, True, False], [2, 125, 0]),
                        ([False, True, True], [3, 125, 0]), ([True, False, False], [4, 500, 0])]
        # On the wire: per inspection the registers (one FC16), then result and toggle coils together (one FC15).
        writes = [(w["fc"], w["address"], w["values"]) for w in plc.writes if w["fc"] != FC_COIL]
        assert writes == [
            (FC_REGISTERS, 0, [1, 500, 0]), (FC_COILS, 0, [1, 0, 1]),
            (FC_REGISTERS, 0, [2, 125, 0]), (FC_COILS, 0, [0, 1, 0]),
            (FC_REGISTERS, 0, [3, 125, 0]), (FC_COILS, 0, [0, 1, 1]),
            (FC_REGISTERS, 0, [4, 500, 0]), (FC_COILS, 0, [1, 0, 0])]
        wait_until_sent(server, "modbus-0", 4)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="modbus-0"} 4.0' in metrics
    finally:
        server.stop()


def test_the_counter_wraps_at_65536_and_the_toggle_starts_from_what_the_plc_has(plc):
    with ModbusTcpClient("127.0.0.1", port=plc.port, timeout=5) as client:
        client.write_coil(7, True, device_id=1)  # the toggle as a previous run left it
    settings = ModbusSettings.model_validate(modbus(plc.port, coils={"toggle": 7}, registers={"counter": 10}))

    async def run() -> None:
        output = ModbusOutput("m", settings)
        await output.connect()
        for counter in (65535, 65536, 65537, 131072 + 5):
            await output.send(Message(result=True, request_id=str(counter), timestamp=0.0, project="p",
                                       counter=counter))
        await output.close()

    asyncio.run(run())
    writes = [(w["fc"], w["address"], w["values"]) for w in plc.wait_for(lambda writes: len(writes) >= 9)]
    assert writes == [(FC_COIL, 7, [1]),
                      (FC_REGISTERS, 10, [65535]), (FC_COIL, 7, [0]), (FC_REGISTERS, 10, [0]), (FC_COIL, 7, [1]),
                      (FC_REGISTERS, 10, [1]), (FC_COIL, 7, [0]), (FC_REGISTERS, 10, [5]), (FC_COIL, 7, [1])]


def test_the_pulse_is_set_for_its_length_then_reset_and_the_result_held_meanwhile(plc):
    settings = ModbusSettings.model_validate(modbus(plc.port, coils={"ok": 0, "ng": 1}, pulse={"coil": 3, "ms": 200}))

    async def run() -> None:
        output = ModbusOutput("m", settings)
        await output.connect()
        for result in (True, False, True):
            await output.send(Message(result=result, request_id="r", timestamp=0.0, project="p"))
        await output.close()  # waits for the last pulse to end

    asyncio.run(run())
    writes = plc.wait_for(lambda writes: len(writes) >= 10)
    pulse = [(w["t"], w["values"][0]) for w in writes if w["address"] == 3 and w["fc"] == FC_COIL]
    assert [value for _, value in pulse] == [0, 1, 0, 1, 0, 1, 0]  # reset on connect, then three pulses
    highs = [pulse[i + 1][0] - pulse[i][0] for i in (1, 3, 5)]
    lows = [pulse[i + 1][0] - pulse[i][0] for i in (2, 4)]
    assert all(0.19 <= high <= 0.35 for high in highs), highs
    assert all(0.19 <= low <= 0.35 for low in lows), lows
    # Each result is written (ok, ng in one FC15) before its pulse is set, never while a pulse is high.
    order = [(w["fc"], w["address"], w["values"]) for w in writes]
    assert order == [(FC_COIL, 3, [0]), (FC_COILS, 0, [1, 0]), (FC_COIL, 3, [1]), (FC_COIL, 3, [0]),
                     (FC_COILS, 0, [0, 1]), (FC_COIL, 3, [1]), (FC_COIL, 3, [0]),
                     (FC_COILS, 0, [1, 0]), (FC_COIL, 3, [1]), (FC_COIL, 3, [0])]


def test_a_dead_plc_never_delays_the_answer_and_gets_the_backlog_in_order(tmp_path):
    port = free_port()
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": SCORED_VERDICT}, outputs=[modbus(
        port, name="plc", coils={"ok": 0, "ng": 1, "toggle": 2}, registers={"counter": 0})])
    server = start_server(project)
    plc = Plc(port)
    try:
        for index in range(20):
            assert analyse(server.url, "ng" if index % 3 == 0 else "ok", f"early-{index}").status_code == 200
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["plc"]
        assert health["connected"] is False and health["failed"] >= 1 and health["dropped"] == 0
        plc.start()  # the PLC comes back: the output reconnects (backoff at most 30 s; here within seconds)
        # Each message writes its registers, then its coils: the 20th coil write ends the backlog.
        writes = plc.wait_for(lambda writes: sum(w["fc"] == FC_COILS for w in writes) >= 20, seconds=40)
        counters = [w["values"][0] for w in writes if w["fc"] == FC_REGISTERS]
        results = [w["values"][:2] for w in writes if w["fc"] == FC_COILS]
        assert counters == list(range(1, 21))
        assert results == [[0, 1] if index % 3 == 0 else [1, 0] for index in range(20)]
        wait_until_sent(server, "plc", 20)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="plc"} 20.0' in metrics
        assert 'appliance_output_messages_total{outcome="failed",output="plc"}' in metrics
    finally:
        server.stop()
        plc.stop()


def test_check_locates_a_bad_url_an_address_used_twice_and_a_pulse_longer_than_the_timeout(tmp_path):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": SCORED_VERDICT}, outputs=[
        {"type": "modbus", "url": "http://plc:502", "coils": {"ok": 0}},
        {"type": "modbus", "url": "tcp://plc:502", "coils": {"ok": 0, "ng": 1}, "pulse": {"coil": 1}},
        {"type": "modbus", "url": "tcp://plc:502", "registers": {"counter": 70000}},
        {"type": "modbus", "url": "tcp://plc:502", "pulse": {"coil": 4, "ms": 3000}},
        {"type": "modbus", "url": {"env": "NO_SUCH_APPLIANCE_MODBUS"}, "coils": {"ok": 0}},
        {"type": "modbus", "url": {"env": "NO_SUCH_APPLIANCE_MODBUS", "default": "tcp://127.0.0.1:5020"},
         "coils": {"ok": 0}, "registers": {"counter": 0}}])
    with pytest.raises(ConfigError) as refused:
        Project.load(project)
    problems = [problem.split(" ", 1)[1] for problem in refused.value.problems]
    lines = [problem.split(" ", 1)[0] for problem in refused.value.problems]
    assert len(problems) == 5, problems
    assert problems[0].startswith("outputs[0].url: ") and "expected tcp://host:port" in problems[0]
    assert problems[1].startswith("outputs[1]") and "coil 1 is used twice (ng and pulse.coil)" in problems[1]
    assert problems[2].startswith("outputs[2].registers.counter: ")
    assert problems[3].startswith("outputs[3]") and "needs timeout_s above 6 s" in problems[3]
    assert problems[4] == ("outputs[4].url: environment variable NO_SUCH_APPLIANCE_MODBUS is not set and has "
                           "no default")
    assert all(line.startswith(str(project / "project.yaml")) for line in lines), lines
