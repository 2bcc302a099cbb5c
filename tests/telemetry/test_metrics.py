"""GET /metrics as Prometheus reads it: every stage, node and model series, rejections by reason, the switches,
the process's own series, readiness, and the per-node score histograms on real models."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, Server, slow_project, start_server, write_project
from tests.nodes.test_anomaly import FLOW, save_red_detector
from tests.nodes.test_faces import ASTRONAUT


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


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: rest.strip() for key, _, rest in (line.partition(":") for line in lines)}


def test_process_series_describe_the_server_process(served: Server) -> None:
    found = samples(served)
    status = proc_status(served.process.pid)
    rss = int(status["VmRSS"].split()[0]) * 1024
    # Memory, descriptors and threads of the server's process (OpenVINO loaded: tens of MB, many threads).
    assert abs(value(found, "process_resident_memory_bytes") - rss) < 0.1 * rss and rss > 50e6
    assert abs(value(found, "process_threads") - int(status["Threads"])) <= 2
    assert value(found, "process_threads") > 4
    assert 5 < value(found, "process_open_fds") < value(found, "process_max_fds")
    assert value(found, "process_cpu_seconds_total") > 0
    assert abs(value(found, "process_start_time_seconds") - time.time()) < 600
    assert value(found, "appliance_ready") == 1


def test_appliance_ready_follows_health_ready(tmp_path: Path) -> None:
    """Two hooks stuck of max_stuck_hooks 2: /health/ready turns 503 and appliance_ready 0 with it."""
    server = start_server(slow_project(tmp_path / "p", 30, node={"timeout_s": 0.2}, limits={"max_stuck_hooks": 2}))
    try:
        png = cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
        requests.post(f"{server.url}/analyze_image", data=png)
        assert requests.get(f"{server.url}/health/ready").status_code == 200
        assert value(samples(server), "appliance_ready") == 1
        requests.post(f"{server.url}/analyze_image", data=png)
        assert requests.get(f"{server.url}/health/ready").status_code == 503
        found = samples(server)
        assert value(found, "appliance_ready") == 0 and value(found, "appliance_stuck_hook_threads") == 2
    finally:
        server.stop()


# A hook that writes scores under ids that are no node of the flow, or not a node of a scored type, and junk
# values: none of it may add a series or break the observation of the real nodes' scores.
JUNK = """
def main(context):
    context["classification"].append({"node": "not-a-node", "predicted": [{"score": 0.9}]})
    context["classification"].append({"node": "verdict", "predicted": [{"score": 0.9}]})
    context["classification"].append({"node": "what", "predicted": "nonsense"})
    context["detectedRectangles"].append({"x": 1, "y": 1, "width": 5, "height": 5, "confidence": 0.3})
"""
SCORED = {"nodes": {
    "faces": {"type": "faces@1", "model": "face_short", "mode": "none", "next": ["what"]},
    "what": {"type": "classify@1", "model": "efficientnet_lite0", "threshold": 0.2, "max_predictions": 3,
             "show_discarded": True, "next": ["junk"]},
    "junk": {"type": "code@1", "module": "junk", "next": ["roi"]},
    **FLOW["nodes"],
}}
HISTOGRAMS = ("appliance_anomaly_score_threshold_ratio", "appliance_classifier_top_score",
              "appliance_detection_confidence")


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("scores")
    store = folder / "models"
    save_red_detector(store)  # threshold 0.5; the score is the crop's highest red value in [0, 1]
    for model in ("efficientnet_lite0", "face_short"):
        (store / model).symlink_to(REPO / "models" / model)
    project = write_project(folder / "p", SCORED, hooks={"junk": JUNK}, models_dir=str(store),
                            cache_dir=str(folder / "cache"))
    server = start_server(project)
    yield server
    server.stop()


def analyzed(server: Server, image: np.ndarray) -> dict:
    response = requests.post(f"{server.url}/analyze_image?response_type=context",
                             data=cv2.imencode(".png", image)[1].tobytes())
    assert response.status_code == 200, response.text
    return json.loads(response.content)


def test_scores_are_observed_per_node_of_the_flow(scored: Server) -> None:
    before = samples(scored)
    # The astronaut with a pure red square inside the anomaly node's crop (x 100-420, y 50-370), off the face.
    red = ASTRONAUT.copy()
    red[250:350, 300:400] = (0, 0, 255)
    contexts = [analyzed(scored, red), analyzed(scored, np.zeros((480, 640, 3), np.uint8))]
    after = samples(scored)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ratio = "appliance_anomaly_score_threshold_ratio"
    # Red frame: score 1.0 over threshold 0.5; black frame: 0.
    assert grew(f"{ratio}_count", node="anomaly") == 2
    assert grew(f"{ratio}_sum", node="anomaly") == pytest.approx(2.0, abs=0.01)
    assert grew(f"{ratio}_bucket", node="anomaly", le="0.1") == 1
    assert grew(f"{ratio}_bucket", node="anomaly", le="1.5") == 1
    assert grew(f"{ratio}_bucket", node="anomaly", le="2.0") == 2

    # The classifier's top score per frame, as the answers report it.
    tops = []
    for ctx in contexts:
        (result,) = [r for r in ctx["classification"] if r["node"] == "what" and r["predicted"] != "nonsense"]
        tops.append(max(entry["score"] for entry in result["predicted"] + result["discarded"]))
    assert grew("appliance_classifier_top_score_count", node="what") == 2
    assert grew("appliance_classifier_top_score_sum", node="what") == pytest.approx(sum(tops), abs=1e-6)

    # One face on the astronaut, none on black: one confidence, the face rectangle's.
    faces = [r["confidence"] for ctx in contexts for r in ctx["detectedRectangles"]
             if r["source"]["moduleId"] == "faces"]
    assert len(faces) == 1 and faces[0] > 0.85
    assert grew("appliance_detection_confidence_count", node="faces") == 1
    assert grew("appliance_detection_confidence_sum", node="faces") == pytest.approx(faces[0], abs=1e-6)

    # Only the flow's scored nodes label a series: not the hook's ids, its rectangle, or the evaluate node.
    labelled = {(name.rsplit("_", 1)[0], dict(labels)["node"]) for (name, labels) in after
                if name.startswith(HISTOGRAMS)}
    assert labelled == {(HISTOGRAMS[0], "anomaly"), (HISTOGRAMS[1], "what"), (HISTOGRAMS[2], "faces")}
    assert all(ctx["errors"] == [] for ctx in contexts), [ctx["errors"] for ctx in contexts]
