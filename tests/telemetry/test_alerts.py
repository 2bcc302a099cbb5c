"""monitoring/alerts.yml: valid rules (`promtool check rules`), alerts that fire and stay quiet as the unit tests
in monitoring/alerts_test.yml expect (`promtool test rules`), on series a real appliance exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import requests
import yaml

from tests.conftest import REPO, needs_tool, start_server, write_project

ALERTS = REPO / "monitoring" / "alerts.yml"
TESTS = REPO / "monitoring" / "alerts_test.yml"
WANTED = {"ApplianceDown", "ApplianceNotReady", "ApplianceQueueFull", "ApplianceRefusing", "ApplianceHooksStuck",
          "ApplianceModelLoadFailed", "ApplianceNGShareJump", "ApplianceScoreDrift"}


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@needs_tool("promtool")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


@needs_tool("promtool")
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    result = subprocess.run(["promtool", "test", "rules", str(TESTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    # Every alert has a case that expects it to fire, and one that expects it quiet.
    cases = yaml.safe_load(TESTS.read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    assert {check["alertname"] for check in checks if check["exp_alerts"]} == WANTED
    assert {check["alertname"] for check in checks if not check["exp_alerts"]} == WANTED
    assert {rule["alert"] for rule in rules()} == WANTED


def test_the_rules_use_only_series_the_appliance_exports(tmp_path: Path) -> None:
    """A renamed metric would leave a rule that never fires: every name in the rules is on a real /metrics page
    (labelled series are declared there before their first sample)."""
    project = write_project(tmp_path / "p", {"nodes": {"v": {"type": "evaluate@1", "rules": [
        {"rule": "no_rectangles"}]}}})
    server = start_server(project)
    try:
        page = requests.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    declared = set(re.findall(r"^# TYPE (\w+) (\w+)", page, re.MULTILINE))
    exported = {name for name, _ in declared} | {f"{name}_total" for name, kind in declared if kind == "counter"} | {
        f"{name}_{suffix}" for name, kind in declared if kind == "histogram" for suffix in ("sum", "count", "bucket")}
    used = {name for rule in rules() for name in re.findall(r"\b((?:appliance|process)_\w+)", rule["expr"])}
    assert used and used <= exported, used - exported
    assert "up{job=\"appliance\"}" in next(rule["expr"] for rule in rules() if rule["alert"] == "ApplianceDown")


@needs_tool("promtool")
def test_the_example_scrape_configuration_loads_the_rules() -> None:
    config = REPO / "monitoring" / "prometheus.yml"
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS: 1 rule files found" in result.stdout, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout
