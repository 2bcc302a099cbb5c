"""project.yaml and flow validation: every problem, with its place (RELIABILITY 7.7-7.11, 11.7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import ConfigError, DeviceUnavailable
from appliance.project import Project
from appliance.runtime.store import switch_current, write_manifest
from tests.conftest import REPO, write_project


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
    assert any("firmware_profile: firmware profile 'vpu' not found; known: auto, cpu, igpu, kserve, npu" in p for p in found)
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


# ---------------------------------------------------------------------------------------------------------
# Layers: configuration loads without the serving path's libraries (issue 16, item 4)

LOAD_PROJECTS = """
import json, sys
from pathlib import Path
from appliance.config.loader import load_project_files
loaded = {}
for folder in map(Path, sys.argv[1:]):
    files = load_project_files(folder)
    loaded[folder.name] = [len(files.flow.nodes), len(files.outputs), len(files.sources)]
print(json.dumps({"loaded": loaded, "imported": [m for m in ("openvino", "cv2") if m in sys.modules]}))
"""


def load_in_a_fresh_interpreter(*projects: Path) -> dict:
    # A fresh interpreter: this test process has imported both long ago.
    env = {**os.environ, "VISION_API_KEY": "k", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LOAD_PROJECTS, *map(str, projects)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def aravis_present() -> bool:
    from appliance.sources.genicam import load_aravis

    try:
        load_aravis()
    except ImportError:
        return False
    return True


def test_loading_a_projects_configuration_imports_neither_openvino_nor_opencv() -> None:
    projects = [folder for folder in sorted((REPO / "projects").iterdir()) if (folder / "project.yaml").is_file()]
    if not aravis_present() and not os.environ.get("APPLIANCE_REQUIRE_TOOLS"):
        # Its camera source is refused at load on a PC without Aravis (make test-tools installs it).
        projects = [folder for folder in projects if folder.name != "camera-line"]
    result = load_in_a_fresh_interpreter(*projects)
    assert {"demo", "line-io", "surface-defects", "vision-api"} <= set(result["loaded"])
    assert result["loaded"]["line-io"][1] == 2  # its outputs were validated too (MQTT and Modbus)
    assert result["imported"] == []


def test_loading_a_project_with_sources_imports_neither_openvino_nor_opencv(tmp_path) -> None:
    # Every source kind is imported to validate one: each imports OpenCV where it reads frames, not at the top.
    project = write_project(tmp_path / "p", {"nodes": {"f": {"type": "flip@1", "direction": "both"}}},
                            sources=[{"type": "folder", "name": "inbox", "path": "inbox"}])
    result = load_in_a_fresh_interpreter(project)
    assert result["loaded"]["p"][2] == 1
    assert result["imported"] == []


def test_the_apis_configuration_knows_are_the_apis_the_server_serves() -> None:
    from appliance.config.apis import API_SETTINGS
    from appliance.server.dialects import DIALECTS

    assert list(API_SETTINGS) == list(DIALECTS)
    for name, dialect in DIALECTS.items():
        assert dialect.settings_model is API_SETTINGS[name], name


def test_api_settings_are_checked_with_their_places(tmp_path):
    project = write_project(tmp_path, {"nodes": {"f": {"type": "flip@1", "direction": "both"}}},
                            apis=["pekat", "imagerecognize"], api_settings={"imagerecognize": {"daily_qouta": 3}})
    (problem,) = problems_of(project)
    assert problem.endswith("api_settings.imagerecognize.daily_qouta: unknown key (did you mean 'daily_quota'?)")
    project = write_project(tmp_path / "b", {"nodes": {"f": {"type": "flip@1", "direction": "both"}}},
                            apis=["pekat", "imagerecognise"])
    (problem,) = problems_of(project)
    assert "apis: unknown API 'imagerecognise'; known: pekat, deepomatic, imagerecognize, raypack, kserve" in problem


def test_a_models_spec_with_a_misspelt_key_is_reported_with_its_file_and_line(tmp_path):
    project = write_project(tmp_path, {"nodes": {"a": {"type": "anomaly@1", "model": "parts"}}})
    version = project / "models" / "parts" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"not read: the spec is refused first")
    (version / "spec.yaml").write_text("task: anomaly\ninput: {size: [64, 64]}\noutputs:\n  scroe: pred_score\n"
                                       "threshold: 1.5\n")
    write_manifest(version)
    switch_current(project / "models" / "parts", "1")
    (problem,) = problems_of(project)
    assert f"nodes.a.model: {version / 'spec.yaml'}:4:3 outputs.scroe: unknown key (did you mean 'score'?); put a " \
           f"version in" in problem
