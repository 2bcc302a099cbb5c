"""projects/line-io as shipped: its MQTT output, pointed at a real Mosquitto by APPLIANCE_MQTT_URL, carries the
verdict of OK and NG frames as JSON on appliance/line-io/result (the Modbus output has its own tests)."""

from __future__ import annotations

import time

import cv2
import numpy as np
import requests

from tests.conftest import REPO, free_port, needs_tool, start_server, wait_until_sent
from tests.outputs.mqtt_peer import Broker, Subscriber

pytestmark = needs_tool("mosquitto")


def part(spot: bool) -> bytes:
    image = np.full((1080, 1920, 3), 210, np.uint8)
    if spot:
        image[500:530, 900:940] = 20
    return cv2.imencode(".png", image)[1].tobytes()


def test_line_io_publishes_the_verdict_of_ok_and_ng_parts(tmp_path):
    broker = Broker(tmp_path / "broker")
    broker.start()
    subscriber = Subscriber(broker.port, "appliance/#").start()
    # No PLC here: the Modbus output retries in the background and must not disturb the MQTT one.
    server = start_server(REPO / "projects" / "line-io", log_file=tmp_path / "server.log", env={
        "APPLIANCE_MQTT_URL": broker.url, "APPLIANCE_MODBUS_URL": f"tcp://127.0.0.1:{free_port()}"})
    try:
        spots = [False, True, False, True]
        for index, spot in enumerate(spots):
            answer = requests.post(f"{server.url}/analyze_image?response_type=context", data=part(spot),
                                   headers={"X-Request-Id": f"line-{index}"}, timeout=30)
            assert answer.status_code == 200 and answer.json()["result"] is (not spot)
        heard = subscriber.wait_for(4)
        assert [m.topic for m in heard] == ["appliance/line-io/result"] * 4
        payloads = [m.json() for m in heard]
        assert [(p["request_id"], p["result"]) for p in payloads] == [
            (f"line-{i}", not spot) for i, spot in enumerate(spots)]
        assert all(abs(p["timestamp"] - time.time()) < 60 and p["project"] == "line-io" for p in payloads)
        assert [p["labels"] for p in payloads] == [[], ["spot"], [], ["spot"]]
        assert [p["rectangles"] for p in payloads] == [0, 1, 0, 1]
        wait_until_sent(server, "broker", 4)
        outputs = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]
        assert outputs["broker"]["sent"] == 4 and outputs["broker"]["connected"] is True
        assert outputs["plc"]["sent"] == 0
    finally:
        server.stop()
        subscriber.stop()
        broker.stop()
