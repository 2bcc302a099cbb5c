"""GET /metrics as Prometheus reads it: every stage, node and model series, rejections by reason, the switches."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, start_server, write_project
from tests.nodes.test_anomaly import FLOW, save_red_detector


def samples(server: Server) -> dict[tuple[str, frozenset], float]:
    """Every sample of the metrics page, parsed by prometheus_client's own parser: {(name, labels): value}."""
    text = requests.get(f"{server.url}/metrics").text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = write_project(tmp_path_factory.mktemp("metrics") / "p", FLOW, api_key="k")
    save_red_detector(project / "models")
    server = start_server(project)
    yield server
    server.stop()


FRAME = np.zeros((480, 640, 3), np.uint8)
KEY = {"X-API-Key": "k"}


def test_stages_nodes_and_inference_are_timed_per_request(served: Server) -> None:
    before = samples(served)
    png = cv2.imencode(".png", FRAME)[1].tobytes()
    assert requests.post(f"{served.url}/analyze_image", data=png, headers=KEY).status_code == 200
    assert requests.post(f"{served.url}/analyze_raw_image?width=640&height=480", data=FRAME.tobytes(),
                         headers=KEY).status_code == 200
    block = shared_memory.SharedMemory(create=True, size=FRAME.nbytes)
    try:
        assert requests.post(f"{served.url}/analyze_image_shared_memory?width=640&height=480&name={block.name}",
                             headers=KEY).status_code == 200
    finally:
        block.close()
        block.unlink()
    after = samples(served)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The shared-memory frame has no body to receive; every request is decoded, inspected and encoded.
    assert grew("appliance_stage_duration_seconds_count", stage="receive") == 2
    for stage in ("decode", "flow", "encode"):
        assert grew("appliance_stage_duration_seconds_count", stage=stage) == 3, stage
    for node, node_type in (("roi", "crop@1"), ("anomaly", "anomaly@1"), ("verdict", "evaluate@1")):
        assert grew("appliance_node_duration_seconds_count", node=node, type=node_type) == 3, node
    assert grew("appliance_inference_duration_seconds_count", model="red", version="1", device="CPU") == 3
    assert grew("appliance_inference_duration_seconds_sum", model="red", version="1", device="CPU") > 0
    assert grew("appliance_verdicts_total", result="ok") == 3
    assert grew("appliance_requests_total", endpoint="/analyze_raw_image", code="200", api="pekat") == 1
    assert value(after, "appliance_model_loads_total", model="red") == 1
    assert value(after, "appliance_model_info", model="red", version="1", device="CPU", precision="f32") == 1
    assert value(after, "appliance_project_info", project="test", flow_sha256=value_of_label(
        after, "appliance_project_info", "flow_sha256")) == 1


def value_of_label(found: dict, name: str, label: str) -> str:
    (labels,) = [dict(key) for (sample, key) in found if sample == name]
    return labels[label]


def test_refusals_are_counted_by_reason(served: Server) -> None:
    before = samples(served)
    assert requests.post(f"{served.url}/analyze_image", data=b"not an image", headers=KEY).status_code == 415
    assert requests.post(f"{served.url}/analyze_image", data=b"x").status_code == 401
    assert requests.post(f"{served.url}/analyze_raw_image?width=60000&height=60000", data=b"x",
                         headers=KEY).status_code == 413
    # A body declared over max_body_bytes is refused from the headers alone.
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nContent-Length: 999999999999\r\n\r\n")
        assert sock.recv(200).startswith(b"HTTP/1.1 413")
    after = samples(served)
    for reason, count in (("bad_input", 1), ("unauthorized", 1), ("too_large", 2)):
        grown = value(after, "appliance_rejected_requests_total", reason=reason) - value(
            before, "appliance_rejected_requests_total", reason=reason)
        assert grown == count, reason


def test_unknown_paths_and_bad_parameters_add_no_series(served: Server) -> None:
    """RELIABILITY 13.3: labels are route names and fixed reasons, never a path, a value or a peer."""
    requests.get(f"{served.url}/nope")
    requests.post(f"{served.url}/analyze_raw_image?width=x&height=1", headers=KEY)
    count = len(requests.get(f"{served.url}/metrics").text.splitlines())
    with requests.Session() as session:
        for index in range(300):
            session.get(f"{served.url}/nope/{index}?data={index}")
            session.post(f"{served.url}/analyze_raw_image?width=w{index}&height=1&data={index}", headers=KEY)
    text = requests.get(f"{served.url}/metrics").text
    assert len(text.splitlines()) == count
    assert "/nope/" not in text and 'endpoint="unmatched"' in text


def test_metrics_can_be_switched_off_or_kept_to_this_machine(tmp_path: Path) -> None:
    off = write_project(tmp_path / "off", {"nodes": {"v": {"type": "evaluate@1", "rules": [
        {"rule": "no_rectangles"}]}}}, metrics={"enabled": False})
    server = start_server(off)
    try:
        response = requests.get(f"{server.url}/metrics")
        assert response.status_code == 404 and response.json()["status"] == 404
        assert requests.get(f"{server.url}/ping").text == "pong"
    finally:
        server.stop()
    local = write_project(tmp_path / "local", {"nodes": {"v": {"type": "evaluate@1", "rules": [
        {"rule": "no_rectangles"}]}}}, metrics={"loopback_only": True})
    server = start_server(local)
    try:
        assert "appliance_build_info" in requests.get(f"{server.url}/metrics").text
    finally:
        server.stop()
