"""The OPC UA output against asyncua's own server on loopback: node values written with the nodes' types after OK
and NG frames, read back by an OPC UA client; a dead server never delays the answer and gets the backlog in order
when it comes back; user name and password, and Basic256Sha256 SignAndEncrypt with self-signed certificates; load
checks with their places; the latency from the answer to the value at the server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from appliance.errors import ConfigError
from appliance.outputs.base import Message
from appliance.outputs.opcua import convert
from appliance.project import Project
from tests.conftest import free_port, start_server, wait_until_sent, write_project
from tests.outputs import FLOW, VERDICT, analyse

asyncua = pytest.importorskip("asyncua")
from asyncua import Server, ua  # noqa: E402
from asyncua.common.callback import CallbackType  # noqa: E402
from asyncua.crypto.permission_rules import User, UserRole  # noqa: E402

NAMESPACE = "urn:appliance:test"
# Line1's variables: (name, type, initial value).
VARIABLES = [("Result", ua.VariantType.Boolean, False), ("Reject", ua.VariantType.Boolean, False),
             ("Score", ua.VariantType.Double, 0.0), ("Id", ua.VariantType.String, ""),
             ("Stamp", ua.VariantType.DateTime, datetime(2000, 1, 1, tzinfo=UTC)),
             ("Count", ua.VariantType.UInt16, 0), ("Total", ua.VariantType.Int32, 0)]


def node(name: str) -> str:
    return f"ns=2;s=Line1.{name}"


NODES = {"result": node("Result"), "ng": node("Reject"), "score": node("Score"), "request_id": node("Id"),
         "timestamp": node("Stamp"), "counter": node("Count")}


class Passwords:
    """asyncua's user manager: one user name and password, others refused."""

    def __init__(self, username: str, password: str):
        self.username, self.password = username, password

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if (username, password) == (self.username, self.password):
            return User(role=UserRole.User)
        return None


class PlcServer:
    """asyncua's server in a thread with its own event loop; records every client write with its arrival time."""

    def __init__(self, port: int, *, users: Passwords | None = None, security: tuple[Path, Path] | None = None):
        self.port, self.users, self.security = port, users, security
        self.url = f"opc.tcp://127.0.0.1:{port}/plc"
        self.writes: list[tuple[float, dict[str, Any]]] = []  # (time.monotonic(), node id -> value)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Server | None = None

    def start(self) -> PlcServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    async def _start(self) -> None:
        server = Server(user_manager=self.users) if self.users else Server()
        await server.init()
        server.set_endpoint(self.url)
        if self.security is not None:
            certificate, key = self.security
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            await server.load_certificate(str(certificate))
            await server.load_private_key(str(key))
        index = await server.register_namespace(NAMESPACE)
        assert index == 2
        line = await server.nodes.objects.add_object(ua.NodeId("Line1", index), "Line1")
        for name, variant, initial in VARIABLES:
            variable = await line.add_variable(ua.NodeId(f"Line1.{name}", index), name, ua.Variant(initial, variant))
            await variable.set_writable()
        await server.start()
        server.subscribe_server_callback(CallbackType.PostWrite, self._written)
        self.server = server

    def _written(self, event: Any, dispatcher: Any) -> None:
        now = time.monotonic()
        if not event.is_external:
            return  # the server's own status
        self.writes.append((now, {item.NodeId.to_string(): item.Value.Value.Value
                                  for item in event.request_params.NodesToWrite}))

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def values(self, key: str) -> list[Any]:
        """What was written to one node, in order."""
        return [written[key] for _, written in self.writes if key in written]

    def wait_for(self, count: int, seconds: float = 20) -> list[tuple[float, dict[str, Any]]]:
        deadline = time.monotonic() + seconds
        while len(self.writes) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.writes


def read_back(url: str, node_ids: list[str], **security: Any) -> list[Any]:
    """The values as any OPC UA client reads them (asyncua's)."""
    async def read() -> list[Any]:
        client = asyncua.Client(url, timeout=10)
        async with client:
            return await client.read_values([client.get_node(node_id) for node_id in node_ids])
    return asyncio.run(read())


@pytest.fixture
def plc() -> Iterator[PlcServer]:
    started = PlcServer(free_port()).start()
    yield started
    started.stop()


def test_values_are_written_with_the_nodes_types_after_ok_and_ng_frames(tmp_path, plc):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "opcua", "name": "line1", "url": plc.url, "nodes": NODES}])
    server = start_server(project)
    try:
        verdicts = ["ok", "ng", "ok", "ng", "ng"]
        started = time.time()
        for index, verdict in enumerate(verdicts):
            assert analyse(server.url, verdict, f"part-{index}").status_code == 200
        writes = plc.wait_for(5)
        assert len(writes) == 5, writes
        assert plc.values(node("Result")) == [verdict == "ok" for verdict in verdicts]
        assert plc.values(node("Reject")) == [verdict == "ng" for verdict in verdicts]
        assert plc.values(node("Id")) == [f"part-{index}" for index in range(5)]
        assert plc.values(node("Count")) == [1, 2, 3, 4, 5]
        # One write request per part, the nodes in the configured order (the counter last).
        assert all(list(written) == list(NODES.values()) for _, written in writes)
        result, reject, score, request_id, stamp, count = read_back(plc.url, list(NODES.values()))
        assert (result, reject, request_id, count) == (False, True, "part-4", 5)
        assert np.isnan(score)  # a Code verdict has no score: NaN, not a stale number
        assert started - 1 <= stamp.replace(tzinfo=UTC).timestamp() <= time.time() + 1
        health = wait_until_sent(server, "line1", 5)
        assert (health["connected"], health["sent"], health["dropped"], health["failed"]) == (True, 5, 0, 0)
    finally:
        server.stop()


def test_a_dead_server_never_delays_the_answer_and_gets_the_backlog_in_order(tmp_path):
    port = free_port()
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "opcua", "name": "plc", "url": {"env": "TEST_OPCUA_URL", "default": f"opc.tcp://127.0.0.1:{port}"},
         "nodes": {"request_id": node("Id"), "counter": node("Total")}, "timeout_s": 2}])
    server = start_server(project)
    plc = PlcServer(port)
    try:
        for index in range(20):
            assert analyse(server.url, "ok" if index % 3 else "ng", f"early-{index}").status_code == 200
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="failed",output="plc"}' in metrics
        assert requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["plc"]["connected"] is False
        plc.start()  # the PLC is back: the output reconnects (backoff at most 30 s; here within seconds)
        plc.wait_for(20, seconds=40)
        assert plc.values(node("Id")) == [f"early-{index}" for index in range(20)]
        assert analyse(server.url, "ng", "late").status_code == 200
        plc.wait_for(21)
        assert plc.values(node("Id"))[-1] == "late"
        assert read_back(plc.url, [node("Id"), node("Total")]) == ["late", 21]
        wait_until_sent(server, "plc", 21)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="plc"} 21.0' in metrics
    finally:
        server.stop()
        plc.stop()


def test_a_user_name_and_password_from_a_file_or_the_environment(tmp_path):
    plc = PlcServer(free_port(), users=Passwords("line", "s3cret!")).start()
    secret = tmp_path / "password"
    secret.write_text("s3cret!\n")
    outputs = [{"type": "opcua", "name": "by-file", "url": plc.url, "nodes": {"request_id": node("Id")},
                "username": "line", "password_file": str(secret)},
               {"type": "opcua", "name": "by-env", "url": plc.url, "nodes": {"counter": node("Total")},
                "username": "line", "password": {"env": "TEST_OPCUA_PASSWORD"}},
               {"type": "opcua", "name": "wrong", "url": plc.url, "nodes": {"ng": node("Reject")},
                "username": "line", "password": {"env": "TEST_OPCUA_WRONG"}}]
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=outputs)
    server = start_server(project, env={"TEST_OPCUA_PASSWORD": "s3cret!", "TEST_OPCUA_WRONG": "guess"})
    try:
        assert analyse(server.url, "ng", "part-1").status_code == 200
        plc.wait_for(2)
        time.sleep(0.5)
        assert plc.values(node("Id")) == ["part-1"] and plc.values(node("Total")) == [1]
        assert plc.values(node("Reject")) == []
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]
        assert health["wrong"]["connected"] is False and health["wrong"]["failed"] >= 1
        assert "Bad" in health["wrong"]["last_error"] or "denied" in health["wrong"]["last_error"].lower(), health
        assert "s3cret" not in server.log_text() and "guess" not in server.log_text()
    finally:
        server.stop()
        plc.stop()


def self_signed(folder: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    usage = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    certificate, key = folder / f"{name}.der", folder / f"{name}.pem"
    asyncio.run(setup_self_signed_certificate(key, certificate, uri, "localhost", usage, {"organizationName": "test"}))
    return certificate, key


def test_basic256sha256_sign_and_encrypt_with_self_signed_certificates(tmp_path):
    server_certificate, server_key = self_signed(tmp_path, "server", "urn:freeopcua:python:server", True)
    certificate, key = self_signed(tmp_path, "appliance", "urn:appliance:line1", False)
    plc = PlcServer(free_port(), security=(server_certificate, server_key)).start()
    secure = {"policy": "Basic256Sha256", "mode": "SignAndEncrypt", "certificate": str(certificate),
              "private_key": str(key), "server_certificate": str(server_certificate),
              "application_uri": "urn:appliance:line1"}
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "opcua", "name": "secure", "url": plc.url, "nodes": {"request_id": node("Id"),
                                                                        "counter": node("Total")},
         "security": secure},
        {"type": "opcua", "name": "plain", "url": plc.url, "nodes": {"ng": node("Reject")}}])
    server = start_server(project)
    try:
        assert analyse(server.url, "ng", "secret-part").status_code == 200
        plc.wait_for(1)
        time.sleep(0.5)
        assert plc.values(node("Id")) == ["secret-part"] and plc.values(node("Total")) == [1]
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]
        assert health["secure"]["connected"] is True
        # The server offers SignAndEncrypt only: a client without security is refused.
        assert plc.values(node("Reject")) == [] and health["plain"]["connected"] is False
    finally:
        server.stop()
        plc.stop()


def test_check_locates_bad_addresses_node_ids_fields_and_files(tmp_path):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "opcua", "url": "http://plc:4840", "nodes": {"result": node("Result")}},
        {"type": "opcua", "url": "opc.tcp://plc:4840", "nodes": {"result": "ns=2;x=Line1"}},
        {"type": "opcua", "url": "opc.tcp://plc:4840", "nodes": {"verdict": node("Result")}},
        {"type": "opcua", "url": "opc.tcp://plc:4840", "nodes": {"result": node("Result")},
         "security": {"policy": "Basic256Sha256", "certificate": "cert.der", "private_key": "/no/such/key.pem"}},
        {"type": "opcua", "url": "opc.tcp://plc:4840", "nodes": {"result": node("Result")}, "password": "plain"},
        {"type": "opcua", "url": {"env": "NO_SUCH_APPLIANCE_OPCUA"}, "nodes": {"result": node("Result")}}])
    with pytest.raises(ConfigError) as refused:
        Project.load(project)
    problems = "\n".join(refused.value.problems)
    print(problems)
    assert "outputs[0].url" in problems and "is not an OPC UA address" in problems
    assert "outputs[1].nodes" in problems and "is not a node id" in problems
    assert "outputs[2].nodes" in problems and "unknown message field 'verdict'" in problems
    assert "outputs[3].security.certificate" in problems and "must be an absolute path" in problems
    assert "outputs[3].security.private_key" in problems and "/no/such/key.pem does not exist" in problems
    assert "outputs[4].password" in problems
    assert "outputs[5].url: environment variable NO_SUCH_APPLIANCE_OPCUA is not set" in problems
    assert all(":" in problem.split(" ", 1)[0] for problem in refused.value.problems)  # file:line first


def test_values_follow_the_nodes_types():
    message = Message(result=True, request_id="r", timestamp=0.0, project="p", counter=70_000)
    assert convert(message.counter, "UInt16") == 70_000 % 65536
    assert convert(2**31 + 5, "Int32") == -2**31 + 5
    assert convert(None, "Int32") is None and np.isnan(convert(None, "Double"))
    assert convert(True, "String") == "true" and convert(1, "Boolean") is True
    assert convert(0.0, "DateTime") == datetime(1970, 1, 1, tzinfo=UTC)
