"""The Grafana dashboard's queries, run by a real Prometheus on loopback against a real appliance under traffic.

Every panel query (and the annotation) must parse and return data: a renamed metric or label, or a join that
matches nothing, fails here. `promtool check metrics` lints the metrics page itself. Beside the appliance under
traffic, the job has a target that was never up and one that served a project and then stopped: the fleet
panel must count both as down.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import requests
import yaml

from tests.conftest import REPO, Server, free_port, needs_tool, start_server, write_project
from tests.nodes.test_anomaly import FLOW, frame, save_red_detector
from tests.nodes.test_classify import save_colour_classifier
from tests.nodes.test_detect import PARTS, YOLO_COLUMNS, save_constant_model

DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
pytestmark = needs_tool("prometheus", "promtool")

HOOK = """
def main(context):
    if context["data"] == "boom":
        raise ValueError("boom")
"""


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and annotation, with Grafana's variables filled in."""
    found = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    found += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return [(title, expr.replace("$__rate_interval", "5s").replace("$project", ".*")) for title, expr in found]


def traffic(server: Server, seconds: float, switch_at: float) -> None:
    """OK and NG frames, a failing hook, refusals, a cut upload, a failed and a good model swap, for ``seconds``."""
    key = {"X-API-Key": "k"}
    ok, ng = frame((255, 0, 0)), frame((0, 0, 255))
    started = time.monotonic()
    switched = False
    with requests.Session() as session:
        while time.monotonic() - started < seconds:
            session.post(f"{server.url}/analyze_image", data=ok, headers=key)
            session.post(f"{server.url}/analyze_image", data=ng, headers=key)
            session.post(f"{server.url}/analyze_image?data=boom", data=ok, headers=key)
            session.post(f"{server.url}/analyze_image", data=b"text", headers=key)
            session.post(f"{server.url}/analyze_image", data=ok)
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nContent-Length: 9000\r\n\r\nab")
            if not switched and time.monotonic() - started > switch_at:
                assert session.post(f"{server.url}/models/switch?model=red&version=9", headers=key).status_code == 400
                assert session.post(f"{server.url}/models/switch?model=red&version=2", headers=key).ok
                switched = True
            time.sleep(0.05)


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A chain, so that every scored node's result reaches the end of the flow: hook, classifier, detector, anomaly.
    flow = {"nodes": {"guard": {"type": "code@1", "module": "guard", "next": ["colour"]},
                      "colour": {"type": "classify@1", "model": "colour", "next": ["parts"]},
                      "parts": {"type": "detect@1", "model": "yolo", "next": ["roi"]},
                      **FLOW["nodes"]}}
    project = write_project(tmp_path_factory.mktemp("dash") / "line-3", flow, hooks={"guard": HOOK}, api_key="k",
                            name="line-3")
    save_red_detector(project / "models", "2", threshold=0.6)
    save_red_detector(project / "models")  # version 1 is current
    save_colour_classifier(project / "models", "colour", exclusive=True)
    save_constant_model(project / "models", "yolo", {"output0": YOLO_COLUMNS.T[None]}, {"decoder": "yolo"}, PARTS)
    server = start_server(project)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def retired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An appliance of project line-4 that is scraped while up, then stopped (the prometheus fixture stops it)."""
    project = write_project(tmp_path_factory.mktemp("dash") / "line-4", {"nodes": {"v": {
        "type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}}, name="line-4")
    server = start_server(project)
    yield server
    server.stop()


def scraped(url: str, up: set[int]) -> bool:
    """Every target scraped once, and up exactly on the ports ``up``."""
    try:
        targets = requests.get(f"{url}/api/v1/targets", timeout=1).json()["data"]["activeTargets"]
    except (requests.ConnectionError, ValueError, KeyError):
        return False
    health = {int(target["labels"]["instance"].rsplit(":", 1)[1]): target["health"] for target in targets}
    return bool(health) and all(state == ("up" if port in up else "down") for port, state in health.items())


@pytest.fixture(scope="module")
def prometheus(appliance: Server, retired: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    never_up = free_port()  # nothing listens there
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "appliance", "static_configs": [
                  {"targets": [f"127.0.0.1:{port}" for port in (appliance.port, retired.port, never_up)]}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(folder / "prometheus.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        # Ready, and the target scraped once: Prometheus applies discovered targets only every 5 s.
        while not scraped(url, {appliance.port, retired.port}):
            assert time.monotonic() < deadline, (folder / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        load = threading.Thread(target=traffic, args=(appliance, 9.0, 3.0))
        load.start()
        load.join()
        retired.stop()
        deadline = time.monotonic() + 10
        while not scraped(url, {appliance.port}):
            assert time.monotonic() < deadline, (folder / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(2)  # two more scrapes after the last request
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_every_dashboard_query_returns_data_from_a_real_scrape(prometheus: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    empty, failed = [], []
    for title, expr in queries(dashboard):
        answer = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}).json()
        if answer["status"] != "success":
            failed.append((title, expr, answer.get("error")))
        elif not answer["data"]["result"]:
            empty.append((title, expr))
    assert failed == [] and empty == [], (failed, empty)


def query(prometheus: str, expr: str) -> dict[str, float]:
    answer = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}).json()
    assert answer["status"] == "success", (expr, answer)
    return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1])
            for r in answer["data"]["result"]}


def test_the_fleet_panel_counts_down_targets_as_down(prometheus: str) -> None:
    """Up: the appliance under traffic. Down: line-4, stopped (it keeps its project), and a target never up,
    which counts under every project since nobody knows which it serves."""
    (panel,) = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == "Appliances up"]
    shown = {target["legendFormat"]: target["expr"] for target in panel["targets"]}
    assert set(shown) == {"up", "down"}
    for project, up, down in ((".*", 1, 2), ("line-3", 1, 1), ("line-4", 0, 2), ("line-9", 0, 1)):
        for legend, expected in (("up", up), ("down", down)):
            found = query(prometheus, shown[legend].replace("$project", project))
            assert found == {"": expected}, (project, legend, found)


def test_score_panels_show_each_scored_node(prometheus: str) -> None:
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    expected = {"Anomaly score / threshold per node (p50, p95)": "anomaly",
                "Classifier top score per node (p50, p5)": "colour",
                "Detection confidence per node (p50)": "parts"}
    for title, node in expected.items():
        expr = panels[title]["targets"][0]["expr"].replace("$__rate_interval", "5s").replace("$project", ".*")
        assert set(query(prometheus, expr)) == {f"node={node},project=line-3"}, title
    # The traffic's frames: pure blue (OK) and pure red (NG; score 1 over threshold 0.5 or 0.6), half each.
    ratio = query(prometheus, 'histogram_quantile(0.95, sum by (le) (rate('
                            'appliance_anomaly_score_threshold_ratio_bucket[1m])))')[""]
    assert 1.5 <= ratio <= 2.0
    memory = panels["Resident memory per process"]["targets"][0]["expr"].replace("$project", "line-3")
    (rss,) = query(prometheus, memory).values()
    assert rss > 50e6


def test_panels_show_what_the_traffic_did(prometheus: str) -> None:
    def ask(expr: str) -> dict[str, float]:
        return query(prometheus, expr)

    project_verdicts = ask('sum by (project, result) (appliance_verdicts_total * on(instance, job) '
                           'group_left(project) appliance_project_info)')
    assert project_verdicts["project=line-3,result=ok"] > 0 and project_verdicts["project=line-3,result=ng"] > 0
    reasons = ask("sum by (reason) (appliance_rejected_requests_total)")
    assert reasons["reason=bad_input"] > 0 and reasons["reason=unauthorized"] > 0
    versions = ask('appliance_model_info{model="red"}')
    assert [labels for labels in versions if "version=2" in labels] and not [
        labels for labels in versions if "version=1" in labels]
    assert ask('sum by (node) (appliance_hook_errors_total)')["node=guard"] > 0
    assert ask("sum(appliance_model_swaps_total)")[""] == 1
    assert ask("sum(appliance_model_load_failures_total)")[""] == 1


def test_promtool_finds_nothing_to_lint_in_the_metrics_page(appliance: Server) -> None:
    page = requests.get(f"{appliance.url}/metrics").text
    result = subprocess.run(["promtool", "check", "metrics"], input=page, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", result


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "project"}
    assert sorted({p["type"] for p in dashboard["panels"]}) == ["row", "stat", "table", "timeseries"]
