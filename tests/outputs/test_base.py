"""The delivery loop every output shares (appliance/outputs/base.py), against peers that never answer: the HTTP
answers do not wait for any output, each output holds the message it is sending, keeps `queue` more in order and
drops (and counts) the rest."""

from __future__ import annotations

import requests

from tests.conftest import start_server, write_project
from tests.outputs import FLOW, VERDICT, SilentPeer, analyse

QUEUE = 5
REQUESTS = 20


def test_answers_never_wait_for_outputs_whose_peers_hang_and_their_queues_fill_then_drop(tmp_path):
    # Each kind waits for something the peer never sends: Modbus its write's reply, MQTT the broker's CONNACK,
    # OPC UA the server's Acknowledge, S7 the COTP connection confirm, the webhook the HTTP answer; the TCP line
    # (which waits for no answer) a connection that never completes.
    peers = {name: SilentPeer(accepting=name != "line") for name in ("plc", "broker", "opcua", "s7", "mes", "line")}
    port = {name: peer.port for name, peer in peers.items()}
    # timeout_s far above the 20 requests' time, so that the held message is still held when /health is read.
    common = {"queue": QUEUE, "timeout_s": 10}
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "modbus", "name": "plc", "url": f"tcp://127.0.0.1:{port['plc']}", "coils": {"ok": 0}, **common},
        {"type": "mqtt", "name": "broker", "url": f"mqtt://127.0.0.1:{port['broker']}", **common},
        {"type": "opcua", "name": "opcua", "url": f"opc.tcp://127.0.0.1:{port['opcua']}",
         "nodes": {"result": "ns=2;s=Line1.Result"}, **common},
        {"type": "s7", "name": "s7", "host": "127.0.0.1", "port": port["s7"], "db": 1, "ok": {"byte": 0, "bit": 0},
         **common},
        {"type": "webhook", "name": "mes", "url": f"http://127.0.0.1:{port['mes']}/results", **common},
        {"type": "tcp", "name": "line", "host": "127.0.0.1", "port": port["line"], **common}])
    server = start_server(project)
    try:
        # Were an answer to wait for an output, it would wait forever here (the client gives up after 30 s).
        answers = [analyse(server.url, "ok", f"part-{index}").status_code for index in range(REQUESTS)]
        assert answers == [200] * REQUESTS
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]
        # The first message is held (being sent or connecting), QUEUE more wait behind it, the rest were dropped.
        assert {name: (entry["sent"], entry["queued"], entry["dropped"]) for name, entry in health.items()} == {
            name: (0, QUEUE, REQUESTS - 1 - QUEUE) for name in peers}
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        for name in peers:
            assert f'appliance_output_messages_total{{outcome="dropped",output="{name}"}} 14.0' in metrics
            assert f'appliance_output_queue_depth{{output="{name}"}} {QUEUE}.0' in metrics
    finally:
        server.stop()
        for peer in peers.values():
            peer.close()
