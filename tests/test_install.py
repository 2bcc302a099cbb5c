"""`appliance export`, `make wheelhouse` and systemd/install.sh: a wheel installed offline that runs a project
from any folder, and a project that runs on its own, where the unit expects it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import requests
import yaml
from skimage import data

from tests.conftest import REPO, free_port, needs_tool, start_server, wait_for_marker, write_project
from tests.server.test_protocol import part_image, png


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
    assert refused.returncode == 73 and "exists and is not empty" in refused.stderr
    broken = write_project(tmp_path / "broken", {"nodes": {"a": {"type": "crop@1", "widht": 3}}})
    refused = appliance("export", str(broken), str(tmp_path / "out"))
    assert refused.returncode == 78 and "unknown key (did you mean 'width'?)" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_export_takes_models_from_another_store_when_the_projects_store_lacks_them(tmp_path: Path) -> None:
    project = tmp_path / "classify"
    shutil.copytree(REPO / "projects" / "classify-objects", project)
    text = (project / "project.yaml").read_text()
    (project / "project.yaml").write_text(text.replace("flow: ../../flows/", f"flow: {REPO}/flows/")
                                          .replace("models_dir: ../../models", "models_dir: ../shared-store"))
    (tmp_path / "shared-store").mkdir()
    missing = appliance("export", str(project), str(tmp_path / "without"))
    assert missing.returncode == 78 and "model 'efficientnet_lite0'" in missing.stderr
    assert not (tmp_path / "without").exists()  # a copy that cannot run is not left behind
    done = appliance("export", str(project), str(tmp_path / "with"), "--models-from", str(REPO / "models"))
    assert done.returncode == 0, done.stderr
    assert f"model efficientnet_lite0 version 1 from {REPO / 'models'}" in done.stdout
    checked = appliance("check", str(tmp_path / "with"))
    assert checked.returncode == 0, checked.stderr


@needs_tool("systemd-analyze")
def test_install_script_places_code_projects_and_a_unit_that_verifies(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**os.environ, "ROOT": str(root), "APPLIANCE_VENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run([str(REPO / "systemd" / "install.sh"), "projects/dark-spots", "projects/classify-objects"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert "next: systemctl enable --now appliance@dark-spots" in done.stdout
    # No source tree in /opt: the code is the installed wheel; the docs the unit names are there.
    assert (root / "opt/appliance/README.md").is_file() and (root / "opt/appliance/LICENSE").is_file()
    assert not (root / "opt/appliance/appliance").exists() and not (root / "opt/appliance/.git").exists()
    for name in ("dark-spots", "classify-objects"):
        checked = appliance("check", str(root / "var/lib/appliance" / name))
        assert checked.returncode == 0, checked.stderr
    unit = root / "etc/systemd/system/appliance@.service"
    instance = tmp_path / "appliance@dark-spots.service"
    instance.write_text(unit.read_text())
    verified = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    # Installing again keeps a project that is already there (its models may have been retrained).
    again = subprocess.run([str(REPO / "systemd" / "install.sh"), "projects/dark-spots"], capture_output=True,
                           text=True, cwd=REPO, env=env)
    assert again.returncode == 0 and "exists: kept as it is" in again.stdout


def _serve_installed(appliance_bin: Path, project: Path, cwd: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([str(appliance_bin), "serve", str(project), "--port", str(port), "--log-file",
                                str(cwd / "server.log")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=cwd)
    if wait_for_marker(process, "STOP_INIT_MODEL", 60, []):
        return process, port
    process.kill()
    raise AssertionError(f"installed server did not start: {process.stderr.read() if process.stderr else ''}")


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


@pytest.mark.slow
@needs_tool("systemd-analyze")
def test_wheelhouse_installs_offline_into_a_fresh_venv_that_serves_from_any_folder(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    started = time.monotonic()
    # As a user would: the Makefile's target (the venv running the tests is the Makefile's venv, up to date).
    built = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "wheelhouse",
                            f"WHEELHOUSE={wheelhouse}", f"BIN={Path(sys.executable).parent}"],
                           capture_output=True, text=True, cwd=REPO, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    build_s = time.monotonic() - started
    wheels = sorted(p.name for p in wheelhouse.glob("*.whl"))
    assert [w for w in wheels if w.startswith("appliance-")] == ["appliance-0.1.0-py3-none-any.whl"]
    pinned = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
              for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    for wheel in wheels:  # every dependency wheel at its pinned version, and no test tool among them
        name, version = wheel.split("-")[:2]
        if name != "appliance":
            assert pinned[name.lower().replace("_", "-")] == version, wheel
    assert not {"pytest", "mypy", "ruff", "scipy", "scikit-image"} & {w.split("-")[0].lower() for w in wheels}
    assert len(list((wheelhouse / "models").glob("*.whl"))) == 8

    root = tmp_path / "root"
    started = time.monotonic()
    env = {**os.environ, "ROOT": str(root), "WHEELHOUSE": str(wheelhouse)}
    env.pop("APPLIANCE_VENV", None)
    installed = subprocess.run([str(REPO / "systemd" / "install.sh"), "projects/dark-spots", "projects/ocr-label"],
                               capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert installed.returncode == 0, installed.stderr[-3000:]
    install_s = time.monotonic() - started
    venv = root / "opt/appliance/venv"
    listed = subprocess.run([str(venv / "bin/python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, env={**os.environ, "PIP_CONFIG_FILE": "/dev/null"})
    packages = {line.split("==")[0].lower() for line in listed.stdout.split() if "==" in line}
    assert "appliance" in packages and not packages & {"pytest", "mypy", "ruff", "scipy", "scikit-image"}
    where = subprocess.run([str(venv / "bin/python"), "-c", "import appliance; print(appliance.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.startswith(f"{venv}/lib/"), where  # the wheel's copy, not the checkout (non-editable)
    # The pretrained store, written offline from the wheelhouse's model wheels.
    assert (root / "opt/appliance/models/ocr_det/current").read_text().strip() == "1"

    # From a folder that is not the checkout, with the installed entry point only.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    project = root / "var/lib/appliance/dark-spots"
    appliance_bin = venv / "bin/appliance"
    for name in ("dark-spots", "ocr-label"):
        checked = subprocess.run([str(appliance_bin), "check", str(root / "var/lib/appliance" / name)],
                                 capture_output=True, text=True, cwd=elsewhere)
        assert checked.returncode == 0, checked.stderr
    devices = subprocess.run([str(appliance_bin), "devices"], capture_output=True, text=True, cwd=elsewhere)
    assert f"({venv}/lib/" in devices.stdout and "cpu    runs on CPU" in devices.stdout
    process, port = _serve_installed(appliance_bin, project, elsewhere)
    try:
        ctx = requests.post(f"http://127.0.0.1:{port}/analyze_image", data=png(part_image(True)), timeout=30).json()
        assert ctx["result"] is False and len(ctx["detectedRectangles"]) == 1
    finally:
        process.terminate()
        assert process.wait(30) == 0
    unit = root / "etc/systemd/system/appliance@.service"
    assert f"ExecStart={appliance_bin} serve /var/lib/appliance/%i" in unit.read_text()
    instance = tmp_path / "appliance@dark-spots.service"
    instance.write_text(unit.read_text())
    verified = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    print(f"\nwheelhouse: built in {build_s:.0f} s, {_size_mb(wheelhouse):.0f} MB "
          f"({_size_mb(wheelhouse) - _size_mb(wheelhouse / 'models'):.0f} MB of code wheels); "
          f"install.sh: {install_s:.0f} s; venv installed {_size_mb(venv):.0f} MB, "
          f"pretrained store {_size_mb(root / 'opt/appliance/models'):.0f} MB; "
          f"the test venv (.[test]): {_size_mb(Path(sys.prefix)):.0f} MB")


def test_default_locations_follow_systemd_then_xdg_then_the_project(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    from appliance import paths
    from appliance.supply.model_supply import default_cache_dir

    for name in ("CACHE_DIRECTORY", "XDG_CACHE_HOME", "XDG_DATA_HOME", "APPLIANCE_MODEL_STORE",
                 "APPLIANCE_WHEEL_CACHE", "APPLIANCE_PROFILES_DIR"):
        monkeypatch.delenv(name, raising=False)
    project = tmp_path / "p"
    assert paths.openvino_cache(project) == project / ".cache" / "openvino"
    assert default_cache_dir() == Path.home() / ".cache" / "appliance" / "wheels"
    assert paths.model_store() == REPO / "models"  # a source checkout: where `make models` writes
    assert paths.profiles_dir() == REPO / "appliance" / "firmware_profiles"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.openvino_cache(project) == tmp_path / "xdg" / "appliance" / "openvino"
    assert default_cache_dir() == tmp_path / "xdg" / "appliance" / "wheels"
    monkeypatch.setenv("CACHE_DIRECTORY", f"{tmp_path / 'unit'}:{tmp_path / 'other'}")
    assert paths.openvino_cache(project) == tmp_path / "unit" / "openvino"
    assert default_cache_dir() == tmp_path / "unit" / "wheels"
    monkeypatch.setenv("APPLIANCE_WHEEL_CACHE", str(tmp_path / "wheels"))
    monkeypatch.setenv("APPLIANCE_MODEL_STORE", str(tmp_path / "store"))
    assert default_cache_dir() == tmp_path / "wheels" and paths.model_store() == tmp_path / "store"
    # Installed from a wheel (no checkout around the package): the XDG data folder.
    monkeypatch.delenv("APPLIANCE_MODEL_STORE")
    monkeypatch.setattr(paths, "source_checkout", lambda: None)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert paths.model_store() == tmp_path / "data" / "appliance" / "models"
