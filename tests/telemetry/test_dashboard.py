"""The Grafana dashboard's queries, run by a real Prometheus on loopback against a real appliance under traffic.

Every panel query (and the annotation) must parse and return data: a renamed metric or label, or a join that
matches nothing, fails here. `promtool check metrics` lints the metrics page itself.
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
    flow = {"nodes": {"guard": {"type": "code@1", "module": "guard", "next": ["roi"]}, **FLOW["nodes"]}}
    project = write_project(tmp_path_factory.mktemp("dash") / "line-3", flow, hooks={"guard": HOOK}, api_key="k",
                            name="line-3")
    save_red_detector(project / "models", "2", threshold=0.6)
    save_red_detector(project / "models")  # version 1 is current
    server = start_server(project)
    yield server
    server.stop()


def scraped(url: str) -> bool:
    try:
        targets = requests.get(f"{url}/api/v1/targets", timeout=1).json()["data"]["activeTargets"]
    except (requests.ConnectionError, ValueError, KeyError):
        return False
    return bool(targets) and all(target["health"] == "up" for target in targets)


@pytest.fixture(scope="module")
def prometheus(appliance: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("prometheus")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "appliance", "static_configs": [
                  {"targets": [f"127.0.0.1:{appliance.port}"]}]}]}
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
        while not scraped(url):
            assert time.monotonic() < deadline, (folder / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        load = threading.Thread(target=traffic, args=(appliance, 9.0, 3.0))
        load.start()
        load.join()
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


def test_panels_show_what_the_traffic_did(prometheus: str) -> None:
    def ask(expr: str) -> dict[str, float]:
        result = requests.get(f"{prometheus}/api/v1/query", params={"query": expr}).json()["data"]["result"]
        return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1]) for r in result}

    project_verdicts = ask('sum by (project, result) (appliance_verdicts_total * on(instance, job) '
                           'group_left(project) appliance_project_info)')
    assert project_verdicts["project=line-3,result=ok"] > 0 and project_verdicts["project=line-3,result=ng"] > 0
    reasons = ask("sum by (reason) (appliance_rejected_requests_total)")
    assert reasons["reason=bad_input"] > 0 and reasons["reason=unauthorized"] > 0
    versions = ask("appliance_model_info")
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
