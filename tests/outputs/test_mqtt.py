"""The MQTT output against a real Mosquitto broker on loopback: the JSON (or templated) payload on its topic, in
order, with QoS and retain; a dead broker that never delays the answer and gets the backlog in order when it is
back; a user and password from the environment; the counts in /metrics; `check` with places."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import requests

from appliance.errors import ConfigError
from appliance.outputs.base import Message
from appliance.outputs.mqtt import MqttOutput, MqttSettings
from appliance.project import Project
from tests.conftest import needs_tool, start_server, wait_until_sent, write_project
from tests.outputs import FLOW, VERDICT, analyse
from tests.outputs.mqtt_peer import Broker, Subscriber

pytestmark = needs_tool("mosquitto", "mosquitto_passwd")



@pytest.fixture
def broker(tmp_path):
    started = Broker(tmp_path / "broker")
    started.start()
    yield started
    started.stop()


def test_each_inspection_is_one_json_message_in_order_on_the_project_topic(tmp_path, broker):
    subscriber = Subscriber(broker.port, "appliance/#").start()
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, name="cell-7",
                            outputs=[{"type": "mqtt", "url": broker.url, "qos": 1}])
    server = start_server(project)
    try:
        verdicts = ["ok", "ng", "ok", "ng", "ng"]
        for index, verdict in enumerate(verdicts):
            assert analyse(server.url, verdict, f"part-{index}").status_code == 200
        heard = subscriber.wait_for(5)
        assert [m.topic for m in heard] == ["appliance/cell-7/result"] * 5
        payloads = [m.json() for m in heard]
        assert [p["request_id"] for p in payloads] == [f"part-{i}" for i in range(5)]
        assert [p["result"] for p in payloads] == [v == "ok" for v in verdicts]
        assert [p["counter"] for p in payloads] == [1, 2, 3, 4, 5]
        assert all(p["project"] == "cell-7" and p["data"] in ("ok", "ng") for p in payloads)
        assert all(abs(p["timestamp"] - time.time()) < 60 for p in payloads)
        assert all(m.qos == 1 and not m.retain for m in heard)
        health = wait_until_sent(server, "mqtt-0", 5)
        assert (health["connected"], health["sent"], health["dropped"], health["failed"]) == (True, 5, 0, 0)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="mqtt-0"} 5.0' in metrics
    finally:
        server.stop()
        subscriber.stop()


def test_a_template_a_topic_with_placeholders_qos_0_and_a_retained_last_result(tmp_path, broker):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, name="cell-8", outputs=[
        {"type": "mqtt", "name": "verdicts", "url": broker.url, "topic": "plant/$project/$verdict", "qos": 0,
         "template": "$ok;$request_id"},
        {"type": "mqtt", "name": "last", "url": broker.url, "topic": "plant/$project/last", "retain": True,
         "fields": ["result", "request_id"]}])
    subscriber = Subscriber(broker.port, "plant/+/+", client_id="live").start()
    server = start_server(project)
    try:
        for index, verdict in enumerate(["ok", "ng", "ok"]):
            assert analyse(server.url, verdict, f"r{index}").status_code == 200
        heard = subscriber.wait_for(6)
        verdicts = [(m.topic, m.payload.decode()) for m in heard if not m.topic.endswith("/last")]
        assert verdicts == [("plant/cell-8/OK", "1;r0"), ("plant/cell-8/NG", "0;r1"), ("plant/cell-8/OK", "1;r2")]
        last = [m.json() for m in heard if m.topic.endswith("/last")]
        assert last == [{"result": True, "request_id": "r0"}, {"result": False, "request_id": "r1"},
                        {"result": True, "request_id": "r2"}]
        # A subscriber that comes later (a PLC gateway after its restart) gets the last result, retained.
        late = Subscriber(broker.port, "plant/cell-8/last", client_id="late").start()
        retained = late.wait_for(1)
        late.stop()
        assert retained[0].retain and retained[0].json() == {"result": True, "request_id": "r2"}
    finally:
        server.stop()
        subscriber.stop()


def test_a_dead_broker_never_delays_the_answer_and_gets_the_backlog_in_order(tmp_path, broker):
    subscriber = Subscriber(broker.port, "line/#").start()
    subscriber.stop()  # its session (QoS 1) stays on the broker: what comes while it is away is kept for it
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "mqtt", "name": "broker", "url": broker.url, "topic": "line/result"}])
    server = start_server(project)
    try:
        assert analyse(server.url, "ok", "first").status_code == 200
        deadline = time.monotonic() + 10
        while requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["broker"]["sent"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        broker.stop()
        for index in range(20):
            assert analyse(server.url, "ng" if index % 2 else "ok", f"away-{index}").status_code == 200
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="failed",output="broker"}' in metrics
        broker.start()  # back: the output reconnects (backoff at most 30 s) and sends the backlog in order
        subscriber.start()
        heard = subscriber.wait_for(21, seconds=45)
        ids = [m.json()["request_id"] for m in heard]
        assert ids == ["first"] + [f"away-{index}" for index in range(20)]
        assert analyse(server.url, "ng", "late").status_code == 200
        assert subscriber.wait_for(22)[-1].json()["request_id"] == "late"
        wait_until_sent(server, "broker", 22)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="sent",output="broker"} 22.0' in metrics
    finally:
        server.stop()
        subscriber.stop()


def test_a_message_larger_than_the_socket_buffers_arrives_whole_and_before_the_next(tmp_path, broker):
    # A publish is written out on the loop's next turn; what the socket cannot take then is written as it drains
    # (the broker is stopped meanwhile, so 12 MB cannot fit in loopback's buffers: tcp_wmem is at most 4 MB).
    subscriber = Subscriber(broker.port, "appliance/#").start()
    big = "x" * (12 << 20)

    def message(request_id: str, data: str = "") -> Message:
        return Message(result=True, request_id=request_id, timestamp=time.time(), project="big", data=data)

    async def publish() -> tuple[int, dict]:
        output = MqttOutput("big", MqttSettings(type="mqtt", url=broker.url, qos=1, timeout_s=60))
        output.start()
        output.offer(message("first"))
        while output.state.sent < 1:
            await asyncio.sleep(0.01)
        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGSTOP)  # the broker stops reading
        try:
            output.offer(message("big", big))
            output.offer(message("after"))
            await asyncio.sleep(0.5)
            sent_while_stopped = output.state.sent
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while output.state.sent < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        health = output.health()
        await output.stop()
        return sent_while_stopped, health

    try:
        sent_while_stopped, health = asyncio.run(publish())
        heard = subscriber.wait_for(3, seconds=30)
    finally:
        subscriber.stop()
    assert sent_while_stopped == 1  # the big one waits for the broker's acknowledgement
    assert [m.json()["request_id"] for m in heard] == ["first", "big", "after"]
    assert heard[1].json()["data"] == big
    assert (health["sent"], health["failed"], health["dropped"]) == (3, 0, 0)


def test_user_and_password_from_the_environment_and_never_in_the_log(tmp_path):
    broker = Broker(tmp_path / "broker", users={"line": "s3cret-pass", "reader": "r34d"})
    broker.start()
    subscriber = Subscriber(broker.port, "#", username="reader", password="r34d").start()
    password_file = tmp_path / "password"
    password_file.write_text("wrong-pass\n")
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "mqtt", "name": "good", "url": {"env": "TEST_MQTT_URL"}, "topic": "good",
         "username": "line", "password": {"env": "TEST_MQTT_PASSWORD"}, "client_id": "appliance-good"},
        {"type": "mqtt", "name": "bad", "url": broker.url, "topic": "bad", "username": "line",
         "password_file": str(password_file)}])
    server = start_server(project, env={"TEST_MQTT_URL": broker.url, "TEST_MQTT_PASSWORD": "s3cret-pass"})
    try:
        assert analyse(server.url, "ok", "auth-1").status_code == 200
        heard = subscriber.wait_for(1)
        assert [(m.topic, m.json()["request_id"]) for m in heard] == [("good", "auth-1")]
        deadline = time.monotonic() + 10
        while (bad := requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["bad"])["failed"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert bad["connected"] is False and bad["last_error"]
        time.sleep(0.5)
        assert "s3cret-pass" not in server.log_text() and "wrong-pass" not in server.log_text()
        assert all(m.topic == "good" for m in subscriber.messages)
    finally:
        server.stop()
        subscriber.stop()
        broker.stop()


def test_check_locates_bad_urls_topics_fields_and_passwords(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MQTT_BAD_URL", "http://broker:1883")
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "mqtt", "url": "tcp://127.0.0.1:1883"},
        {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "topic": "a/#"},
        {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "topic": "a/$verdcit"},
        {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "fields": ["result", "sc0re"]},
        {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "qos": 3},
        {"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "password": "in-the-yaml"},
        {"type": "mqtt", "url": {"env": "TEST_MQTT_BAD_URL"}},
        {"type": "mqtt", "url": {"env": "NO_SUCH_APPLIANCE_BROKER"}}])
    with pytest.raises(ConfigError) as refused:
        Project.load(project)
    problems = "\n".join(refused.value.problems)
    for index, text in enumerate(["broker url 'tcp://127.0.0.1:1883'", "no wildcard", "unknown placeholder $verdcit",
                                  "unknown field 'sc0re'", "qos", "password", "broker url 'http://broker:1883'",
                                  "environment variable NO_SUCH_APPLIANCE_BROKER is not set"]):
        assert f"outputs[{index}]" in problems and text in problems, (index, text, problems)
