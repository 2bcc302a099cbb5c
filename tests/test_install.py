"""`appliance export` and systemd/install.sh: a project that runs on its own, where the unit expects it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import requests
import yaml
from skimage import data

from tests.conftest import REPO, needs_tool, start_server, write_project


def appliance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, cwd=REPO)


def test_export_copies_the_flow_and_only_the_models_it_uses(tmp_path: Path) -> None:
    done = appliance("export", str(REPO / "projects" / "classify-objects"), str(tmp_path / "copy"))
    assert done.returncode == 0, done.stderr
    assert "model efficientnet_lite0 version 1" in done.stdout
    config = yaml.safe_load((tmp_path / "copy" / "project.yaml").read_text())
    assert config["flow"] == "flow.yaml" and config["models_dir"] == "models"
    assert sorted(p.name for p in (tmp_path / "copy" / "models").iterdir()) == ["efficientnet_lite0"]
    # The copy serves from anywhere, with the original project out of reach.
    moved = tmp_path / "elsewhere" / "classify-objects"
    shutil.move(tmp_path / "copy", moved)
    server = start_server(moved, log_file=tmp_path / "server.log")
    try:
        coffee = cv2.imencode(".png", cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))[1].tobytes()
        ctx = requests.post(f"{server.url}/analyze_image", data=coffee).json()
        assert ctx["result"] is True and ctx["classNames"][0]["label"] == "espresso"
    finally:
        server.stop()


def test_export_refuses_a_non_empty_destination_and_an_invalid_project(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    refused = appliance("export", str(REPO / "projects" / "dark-spots"), str(tmp_path / "full"))
    assert refused.returncode == 1 and "exists and is not empty" in refused.stderr
    broken = write_project(tmp_path / "broken", {"nodes": {"a": {"type": "crop@1", "widht": 3}}})
    refused = appliance("export", str(broken), str(tmp_path / "out"))
    assert refused.returncode == 1 and "unknown key (did you mean 'width'?)" in refused.stdout
    assert not (tmp_path / "out").exists()


@needs_tool("systemd-analyze")
def test_install_script_places_code_projects_and_a_unit_that_verifies(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**os.environ, "ROOT": str(root), "APPLIANCE_VENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run([str(REPO / "systemd" / "install.sh"), "projects/dark-spots", "projects/classify-objects"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert "next: systemctl enable --now appliance@dark-spots" in done.stdout
    assert (root / "opt/appliance/firmware_profiles/cpu.yaml").is_file()
    assert not (root / "opt/appliance/.git").exists() and not (root / "opt/appliance/.venv").exists()
    for name in ("dark-spots", "classify-objects"):
        checked = appliance("check", str(root / "var/lib/appliance" / name))
        assert checked.returncode == 0, checked.stdout
    unit = root / "etc/systemd/system/appliance@.service"
    instance = tmp_path / "appliance@dark-spots.service"
    instance.write_text(unit.read_text())
    verified = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    # Installing again keeps a project that is already there (its models may have been retrained).
    again = subprocess.run([str(REPO / "systemd" / "install.sh"), "projects/dark-spots"], capture_output=True,
                           text=True, cwd=REPO, env=env)
    assert again.returncode == 0 and "exists: kept as it is" in again.stdout
