"""project.yaml and flow validation: every problem, with its place (RELIABILITY 7.7-7.11, 11.7)."""

from __future__ import annotations

import pytest

from appliance.errors import ConfigError, DeviceUnavailable
from appliance.project import Project
from tests.conftest import write_project


def problems_of(folder) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Project.load(folder)
    return caught.value.problems


def test_an_inline_flow_is_validated_with_places_in_project_yaml(tmp_path):
    (tmp_path / "project.yaml").write_text(
        "name: inline\n"
        "flow:\n"
        "  nodes:\n"
        "    a: {type: crop@1, x: 0, y: 0, width: 5, height: 5, next: [b]}\n"
        "    b: {type: evaluate@1, rules: [{rule: max_rectangles, count: 0, lable: x}]}\n")
    (problem,) = problems_of(tmp_path)
    assert problem.endswith("project.yaml:5:68 flow.nodes.b.rules[0].lable: unknown key (did you mean 'label'?)")
    (tmp_path / "project.yaml").write_text((tmp_path / "project.yaml").read_text().replace("lable", "label"))
    assert Project.load(tmp_path).node_count == 2


def test_project_settings_problems_are_all_reported(tmp_path):
    (tmp_path / "project.yaml").write_text("name: bad name\nport: 70000\nflow: missing.yaml\napi_key: ''\n"
                                           "limts: {}\n")
    found = [p.split(" ", 1)[1] for p in problems_of(tmp_path)]
    assert found[0].startswith("name: String should match pattern")
    assert found[1] == "port: Input should be less than or equal to 65535"
    assert found[2] == "api_key: api_key is empty; remove the key to serve without one, or set a real key"
    assert found[3] == "limts: unknown key (did you mean 'limits'?)"


def test_missing_flow_file_and_unknown_profile(tmp_path):
    (tmp_path / "project.yaml").write_text("name: p\nflow: nowhere.yaml\nfirmware_profile: vpu\n")
    found = problems_of(tmp_path)
    assert any("firmware_profile: firmware profile 'vpu' not found; known: auto, cpu, igpu, npu" in p for p in found)
    assert any("flow: flow file" in p and "nowhere.yaml not found" in p for p in found)


def test_a_profile_whose_device_is_absent_names_the_device_and_the_fallback(tmp_path):
    project = write_project(tmp_path, {"nodes": {"f": {"type": "flip@1", "direction": "both"}}},
                            firmware_profile="npu")
    with pytest.raises(DeviceUnavailable) as caught:
        Project.load(project)
    (problem,) = caught.value.problems
    assert "firmware_profile: profile npu: device NPU not available (available: CPU); fallback CPU is present but " \
           "not allowed" in problem


def test_api_key_from_environment_and_file(tmp_path, monkeypatch):
    flow = {"nodes": {"f": {"type": "flip@1", "direction": "both"}}}
    project = write_project(tmp_path / "env", flow, api_key={"env": "TEST_APPLIANCE_KEY"})
    assert any("environment variable TEST_APPLIANCE_KEY is not set" in p for p in problems_of(project))
    monkeypatch.setenv("TEST_APPLIANCE_KEY", "from-env")
    assert Project.load(project).api_key == b"from-env"
    project = write_project(tmp_path / "file", flow, api_key={"file": "key.txt"})
    (project / "key.txt").write_text("from-file\n")
    assert Project.load(project).api_key == b"from-file"


def test_duplicate_yaml_keys_are_reported(tmp_path):
    project = write_project(tmp_path, "nodes:\n  a: {type: flip@1, direction: both}\n  a: {type: flip@1, "
                                      "direction: both}\n")
    assert any("nodes.a: duplicate key" in p for p in problems_of(project))
