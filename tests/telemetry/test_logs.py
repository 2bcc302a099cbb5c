"""Structured logs (RELIABILITY 15): one JSON line per request at DEBUG, refusals at WARNING, no secrets or pixels."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import requests

from tests.conftest import Server, start_server, write_project

FIELDS = {"ts", "level", "logger", "msg", "project", "request_id", "endpoint", "api", "status", "duration_ms",
          "peer"}


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = write_project(tmp_path_factory.mktemp("logs") / "p", {"nodes": {"v": {
        "type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}}, name="logged", api_key="Sesame-Key-77",
        apis=["pekat", "imagerecognize", "raypack", "deepomatic"])
    server = start_server(project, log_level="DEBUG")
    yield server
    server.stop()


def lines(server: Server) -> list[dict]:
    time.sleep(0.2)  # the handler writes after the answer
    return [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]


def test_each_request_is_one_json_line_with_its_id_and_outcome(logged: Server) -> None:
    frame = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    ok = requests.post(f"{logged.url}/analyze_image?data=lot-1", data=frame, headers={"X-API-Key": "Sesame-Key-77"})
    refused = requests.post(f"{logged.url}/analyze_image", data=frame)
    entries = {entry.get("request_id"): entry for entry in lines(logged)}
    served, denied = entries[ok.headers["X-Request-Id"]], entries[refused.headers["X-Request-Id"]]
    assert FIELDS <= set(served) and FIELDS <= set(denied)
    assert (served["level"], served["status"], served["endpoint"], served["api"]) == (
        "DEBUG", 200, "/analyze_image", "pekat")
    assert (denied["level"], denied["status"]) == ("WARNING", 401)
    assert served["project"] == "logged" and served["peer"] == "127.0.0.1" and served["duration_ms"] > 0
    assert served["query"] == "data=***"


def test_no_key_data_or_image_bytes_reach_the_log(logged: Server) -> None:
    marker = b"PIXEL-MARKER-" + bytes(range(32, 127))
    requests.post(f"{logged.url}/analyze_image?api_key=Sesame-Key-77&data=DATA-MARKER", data=marker)
    requests.post(f"{logged.url}/analyze_raw_image?width=4&height=4", data=marker[:48],
                  headers={"Authorization": "Bearer Sesame-Key-77"})
    requests.post(f"{logged.url}/analyze_image", data=marker, headers={"X-API-Key": "wrong-Sesame"})
    # The other APIs' keys: imagerecognize's in the query (type=cache) and in a form, RAYPACK's and Deepomatic's.
    cache = requests.get(f"{logged.url}/api/v2/?apikey=Sesame-Key-77&type=cache")
    assert cache.status_code == 200 and json.loads(cache.text)["data"]["type"] == "cache"
    requests.post(f"{logged.url}/api/v2/", data={"apikey": "wrong-Sesame", "type": "objects"}, files={"file": marker})
    requests.post(f"{logged.url}/recog", data={"apikey": "wrong-Sesame", "model": "1"}, files={"file": marker})
    requests.get(f"{logged.url}/v0.7/recognition/public", headers={"X-API-KEY": "wrong-Sesame"})
    entries = lines(logged)
    text = "\n".join(json.dumps(entry) for entry in entries) + logged.log_text()
    for secret in ("Sesame-Key-77", "wrong-Sesame", "DATA-MARKER", "PIXEL-MARKER"):
        assert secret not in text, secret
    assert "api_key=***" in text and "apikey=***&type=cache" in text
    assert {entry["api"] for entry in entries if entry.get("status") == 401} >= {"imagerecognize", "raypack",
                                                                                "deepomatic", "pekat"}
