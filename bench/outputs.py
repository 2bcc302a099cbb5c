"""Outputs: how late each output's message reaches its peer after the HTTP answer, and what sending to every output
at once costs the inspection's throughput.

Real peers on loopback, each from its own library and in its own process (so that what they cost is not taken
from the client threads' GIL in this process): Mosquitto with a paho subscriber (MQTT, QoS 1), pymodbus's TCP
server logging every write (Modbus: coils and the counter register), asyncua's server recording every write (OPC
UA), a TCP listener (PEKAT's "Output: TCP" line). The project is projects/line-io's flow (the dark-spots Code hook
on 1920x1080 PNG frames, half of them NG).

Latency rows offer frames at 1 and 50 frames/s and take, for each frame, the moment its
message reached the peer minus the moment the client had the answer (negative: the message came first). MQTT and
OPC UA carry the request id; Modbus writes carry the counter, so the n-th coil write belongs to the n-th answer
(outputs keep order). Throughput rows are a closed loop of `--clients` clients for `--seconds` each, with all four
outputs on and with none, alternated `--rounds` times; the ratio is on / off (goal >= 0.95). Client, server and
peers share the 2 cores, so the throughput moves with whatever else runs; the appliance's own CPU per inspection
(all its threads, and its event loop's thread alone, where the outputs run) says what the outputs cost it.

Last, each output alone on an event loop of the bench's own process (`--per-output` messages one at a time,
`--rounds` times): its loop thread's CPU per message, what each kind costs apart from the others and from HTTP.

    .venv/bin/python bench/outputs.py [--seconds 4] [--clients 2] [--rounds 2] [--per-output 300]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import Server, free_port, start_server  # noqa: E402
from tests.outputs.mqtt_peer import Broker  # noqa: E402
from tests.outputs.test_modbus import FC_COILS, Plc  # noqa: E402
from tests.outputs.test_opcua import NODES  # noqa: E402


def frames() -> list[bytes]:
    images = []
    for spot in (False, True):
        image = np.full((1080, 1920, 3), 210, np.uint8)
        if spot:
            image[500:530, 900:940] = 20
        images.append(cv2.imencode(".png", image)[1].tobytes())
    return images


def project(folder: Path, outputs: list[dict]) -> Path:
    folder.mkdir(parents=True)
    config = {"name": "line-io", "flow": str(REPO / "flows" / "dark_spots.yaml"),
              "code": {"folder": str(REPO / "projects" / "dark-spots" / "code")}, "outputs": outputs}
    (folder / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


class LineListener:
    """A TCP peer that timestamps each line it reads (the TCP output's `$request_id` template)."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.arrived: dict[str, float] = {}
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection, connection.makefile("r") as lines:
                for line in lines:
                    self.arrived[line.strip()] = time.monotonic()

    def stop(self) -> None:
        self.listener.close()


def _peer(kind: str, port: int, connection: Connection) -> None:
    """One peer in a process of its own; answers "heard" with what it heard so far: (key, time.monotonic()) pairs,
    the key being the request id (MQTT, OPC UA, TCP line). CLOCK_MONOTONIC is the machine's: comparable here."""
    heard: Callable[[], list[tuple[str, float]]]
    if kind == "mqtt":
        from tests.outputs.mqtt_peer import Subscriber

        subscriber = Subscriber(port, "appliance/#").start()
        heard = lambda: [(message.json()["request_id"], message.at) for message in list(subscriber.messages)]  # noqa: E731
    elif kind == "opcua":
        from tests.outputs.test_opcua import PlcServer, node

        server = PlcServer(port).start()
        heard = lambda: [(written[node("Id")], at) for at, written in list(server.writes)]  # noqa: E731
    else:
        line = LineListener(port)
        heard = lambda: list(line.arrived.items())  # noqa: E731
    connection.send("ready")
    while connection.recv() == "heard":
        connection.send(heard())


class Peer:
    """A peer started by `_peer` in its own process."""

    def __init__(self, kind: str, port: int):
        self.port = port
        self.connection, theirs = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=_peer, args=(kind, port, theirs),
                                                                     daemon=True)
        self.process.start()
        if not self.connection.poll(60):
            raise RuntimeError(f"the {kind} peer did not start")
        self.connection.recv()

    def heard(self) -> dict[str, float]:
        self.connection.send("heard")
        return dict(self.connection.recv())

    def stop(self) -> None:
        self.process.kill()
        self.process.join(10)


def thread_cpu_ms(pid: int) -> tuple[float, float]:
    """CPU time so far of a process's main thread (the event loop: where the outputs run) and of all its threads,
    in ms (Linux /proc/<pid>/task/*/schedstat: nanoseconds on the CPU)."""
    loop = every = 0.0
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            on_cpu = int(Path(f"/proc/{pid}/task/{thread}/schedstat").read_text().split()[0]) / 1e6
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        every += on_cpu
        if int(thread) == pid:
            loop += on_cpu
    return loop, every


def paced(url: str, images: list[bytes], rate: float, seconds: float, tag: str) -> list[tuple[str, float]]:
    """(request id, answered at) for frames offered at `rate` (a pool of 4 senders keeps the pace when an answer
    takes longer than the interval), in the order of the answers."""
    answered: dict[str, float] = {}
    sessions = threading.local()

    def send(index: int) -> None:
        if not hasattr(sessions, "session"):
            sessions.session = requests.Session()
        request_id = f"{tag}-{index}"
        sessions.session.post(f"{url}/analyze_image", data=images[index % 2], headers={"X-Request-Id": request_id},
                              timeout=30).raise_for_status()
        answered[request_id] = time.monotonic()

    count = max(10, int(rate * seconds))  # at 1 frame/s, 10 frames at least
    with ThreadPoolExecutor(4) as pool:
        start = time.monotonic()
        for index in range(count):
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
            pool.submit(send, index)
    return sorted(answered.items(), key=lambda item: item[1])  # outputs send in the order answers were given


def wait_until(done: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)


def closed_loop(url: str, images: list[bytes], clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def client(slot: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                session.post(f"{url}/analyze_image", data=images[counts[slot] % 2], timeout=30).raise_for_status()
                counts[slot] += 1

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def per_output_cpu_ms(outputs: list[dict[str, Any]], count: int, gap_s: float = 0.01) -> dict[str, float]:
    """Each output alone on an event loop of this process, sending `count` messages one at a time (`gap_s` apart,
    each sent before the next comes, as on a line): the loop thread's CPU per message, minus the same loop's
    with no output. What one kind costs, apart from the HTTP path and from the other kinds."""
    from appliance.outputs import OUTPUT_TYPES, output_settings
    from appliance.outputs.base import Message
    from appliance.telemetry.metrics import Metrics

    metrics = Metrics("line-io", "0" * 64)  # the server's own metrics: their cost is part of each message's
    message = Message(result=True, request_id="", timestamp=time.time(), project="line-io", score=0.3,
                      threshold=0.5, rectangles=1, labels=("spot",))

    async def run(config: dict[str, Any] | None) -> float:
        output = None
        if config is not None:
            settings = output_settings(config)
            output = OUTPUT_TYPES[settings.type](f"alone-{settings.type}", settings, metrics)
            output.start()

        async def offer(tag: str, index: int) -> None:
            if output is not None:
                output.offer(replace(message, request_id=f"{tag}-{index}", counter=index, result=bool(index % 2)))
            await asyncio.sleep(gap_s)

        for index in range(10):  # connects
            await offer("alone-warm", index)
        started = time.thread_time()
        for index in range(count):
            await offer("alone", index)
        while output is not None and output.state.pending:
            await asyncio.sleep(0.001)
        spent = time.thread_time() - started
        if output is not None:
            sent = output.state.sent
            await output.stop()
            if sent != count + 10:
                raise RuntimeError(f"{output.name} sent {sent} of {count + 10}: {output.health()}")
        return spent / count * 1000

    idle = asyncio.run(run(None))
    return {config["type"]: asyncio.run(run(config)) - idle for config in outputs}


def row(name: str, rate: float, late_ms: list[float], sent: int) -> str:
    late_ms.sort()
    return (f"| {name}, {rate:g} frames/s | {sent} | {len(late_ms)} | {statistics.median(late_ms):.2f} | "
            f"{late_ms[min(len(late_ms) - 1, int(len(late_ms) * 0.99))]:.2f} | {late_ms[-1]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="closed-loop rows of each, alternated")
    parser.add_argument("--per-output", type=int, default=300, metavar="MESSAGES",
                        help="messages each output sends alone, per round, to tell what each kind costs (0: skip)")
    args = parser.parse_args()
    images = frames()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = Broker(folder / "broker")
        broker.start()
        modbus = Plc(free_port())
        modbus.start()
        peers: dict[str, Peer] = {}
        on: Server | None = None
        off: Server | None = None
        try:
            peers = {"mqtt": Peer("mqtt", broker.port), "opcua": Peer("opcua", free_port()),
                     "tcp": Peer("tcp", free_port())}
            outputs: list[dict[str, Any]] = [
                {"type": "mqtt", "url": broker.url, "qos": 1},
                {"type": "modbus", "url": f"tcp://127.0.0.1:{modbus.port}", "unit": 1, "coils": {"ok": 0, "ng": 1},
                 "registers": {"counter": 0}},
                {"type": "opcua", "url": f"opc.tcp://127.0.0.1:{peers['opcua'].port}/plc", "nodes": NODES},
                {"type": "tcp", "host": "127.0.0.1", "port": peers["tcp"].port, "template": "$request_id"}]
            on = start_server(project(folder / "on", outputs), log_level="WARNING")
            off = start_server(project(folder / "off", []), log_level="WARNING")
            for _ in range(5):  # warm: each output connects on its first message
                requests.post(f"{on.url}/analyze_image", data=images[0], timeout=30).raise_for_status()
                requests.post(f"{off.url}/analyze_image", data=images[0], timeout=30).raise_for_status()
            wait_until(lambda: len(peers["tcp"].heard()) >= 5)
            print(f"load average before: {os.getloadavg()[0]:.1f}")
            print("| output, rate | sent | heard | median ms | p99 ms | max ms |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for rate in (1.0, 50.0):
                coil_writes_before = sum(w["fc"] == FC_COILS for w in list(modbus.writes))
                answered = paced(on.url, images, rate, args.seconds, f"r{rate:g}")
                ids = {request_id for request_id, _ in answered}

                def all_heard(ids: set[str] = ids, coils_before: int = coil_writes_before) -> bool:
                    return (all(ids <= set(peer.heard()) for peer in peers.values())
                            and sum(w["fc"] == FC_COILS for w in list(modbus.writes)) >= coils_before + len(ids))

                wait_until(all_heard)
                coils = [w["t"] for w in modbus.writes if w["fc"] == FC_COILS][coil_writes_before:]
                for name, kind in (("MQTT", "mqtt"), ("OPC UA", "opcua"), ("TCP line", "tcp")):
                    arrived = peers[kind].heard()
                    print(row(name, rate, [(arrived[r] - t) * 1000 for r, t in answered if r in arrived],
                              len(answered)))
                print(row("Modbus coils", rate, [(at - t) * 1000 for (_, t), at in zip(answered, coils, strict=False)],
                          len(answered)))
            rates: dict[str, list[float]] = {}
            loop_ms: dict[str, list[float]] = {}
            every_ms: dict[str, list[float]] = {}
            peers_ms: list[float] = []
            peer_pids: list[int] = [peer.process.pid for peer in peers.values() if peer.process.pid is not None]
            peer_pids += [started.process.pid for started in (broker, modbus) if started.process is not None]

            def peers_cpu_ms() -> float:
                return sum(thread_cpu_ms(pid)[1] for pid in peer_pids)

            for name, server in [("off", off), ("on", on)] * args.rounds:
                loop_before, every_before = thread_cpu_ms(server.process.pid)
                peers_before = peers_cpu_ms()
                rate = closed_loop(server.url, images, args.clients, args.seconds)
                loop_after, every_after = thread_cpu_ms(server.process.pid)
                inspections = rate * args.seconds
                rates.setdefault(name, []).append(rate)
                loop_ms.setdefault(name, []).append((loop_after - loop_before) / inspections)
                every_ms.setdefault(name, []).append((every_after - every_before) / inspections)
                if name == "on":
                    peers_ms.append((peers_cpu_ms() - peers_before) / inspections)
            best = {name: max(values) for name, values in rates.items()}
            loop = {name: statistics.median(values) for name, values in loop_ms.items()}
            every = {name: statistics.median(values) for name, values in every_ms.items()}
            print()
            print(f"closed loop, {args.clients} clients, {args.seconds:g} s a row (best of {args.rounds}): no output "
                  f"{best['off']:.1f} inspections/s, MQTT + Modbus + OPC UA + TCP on {best['on']:.1f} inspections/s, "
                  f"ratio {best['on'] / best['off']:.3f} (goal >= 0.95)")
            # The peers and the client run on the same 2 cores: the appliance's own CPU per inspection tells what the
            # outputs cost it, apart from what the others take from the machine.
            print(f"appliance CPU per inspection (median of {args.rounds}): no output {every['off']:.1f} ms, all four "
                  f"on {every['on']:.1f} ms, ratio {every['off'] / every['on']:.3f}; its event loop's thread "
                  f"{loop['off']:.2f} ms -> {loop['on']:.2f} ms (+{loop['on'] - loop['off']:.2f} ms for four messages)")
            # What a plant's PLC, broker and OPC UA server spend elsewhere, taken here from the same 2 cores.
            print(f"the peers' CPU per inspection with all four on (median of {args.rounds}): "
                  f"{statistics.median(peers_ms):.1f} ms (Mosquitto, the paho subscriber, pymodbus's and asyncua's "
                  "servers, the TCP listener)")
            if args.per_output:
                alone: dict[str, list[float]] = {}
                for _ in range(args.rounds):
                    for kind, cost in per_output_cpu_ms(outputs, args.per_output).items():
                        alone.setdefault(kind, []).append(cost)
                print(f"each output alone, event loop CPU per message (median of {args.rounds} x "
                      f"{args.per_output} messages): " + ", ".join(
                          f"{kind} {statistics.median(costs):.2f} ms" for kind, costs in alone.items()))
            print(f"load average after: {os.getloadavg()[0]:.1f}")
        finally:
            for started in (on, off):
                if started is not None:
                    started.stop()
            for peer in peers.values():
                peer.stop()
            broker.stop()
            modbus.stop()


if __name__ == "__main__":
    main()
