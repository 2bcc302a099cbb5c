"""The command line as a user meets it: --help everywhere, and the exit codes and streams of `check` and `serve`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import build_parser
from tests.conftest import REPO, free_port, write_project

EXIT_CONFIG = 78
EXIT_DEVICE_ABSENT = 69


def appliance(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand the parser knows, found by walking it (a new one is covered by itself)."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


COMMANDS = command_paths(build_parser())
# `train TASK --help` hands --help to the trainer's own parser.
COMMANDS += [("train", "anomaly"), ("train", "segment")]


def test_the_walk_finds_every_command() -> None:
    top = {path[0] for path in COMMANDS if path}
    assert top == {"serve", "check", "devices", "models", "export", "faces", "train", "pekat-dist"}
    assert ("models", "switch") in COMMANDS and ("faces", "enrol") in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda path: " ".join(path) or "appliance")
def test_help_exits_0_with_usage_on_stdout(command: tuple[str, ...], tmp_path: Path) -> None:
    done = appliance(*command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and done.stderr == ""


def test_version() -> None:
    done = appliance("--version", cwd=REPO)
    assert done.returncode == 0 and done.stdout.startswith("appliance ")


def test_check_a_valid_project_says_ok_on_stdout(tmp_path: Path) -> None:
    done = appliance("check", str(REPO / "projects" / "dark-spots"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "dark-spots: OK (3 nodes, flow dark_spots.yaml)\n" and done.stderr == ""


def test_check_and_serve_exit_78_with_the_problems_on_stderr(tmp_path: Path) -> None:
    project = write_project(tmp_path / "typo", {"nodes": {"a": {"type": "crop@1", "x": 0, "y": 0, "width": 3,
                                                                "height": 3, "widht": 3}}})
    checked = appliance("check", str(project), cwd=tmp_path)
    assert checked.returncode == EXIT_CONFIG
    assert checked.stdout == ""
    assert "nodes.a.widht: unknown key (did you mean 'width'?)" in checked.stderr
    assert checked.stderr.endswith("1 problem(s)\n")
    served = appliance("serve", str(project), "--port", str(free_port()), cwd=tmp_path)
    assert served.returncode == EXIT_CONFIG and served.stdout == ""
    assert "nodes.a.widht: unknown key (did you mean 'width'?)" in served.stderr
    assert served.stderr.endswith("1 problem(s); not serving\n")


def test_check_and_serve_exit_78_for_an_unknown_firmware_profile(tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", {"nodes": {"a": {"type": "crop@1", "x": 0, "y": 0, "width": 3,
                                                             "height": 3}}}, firmware_profile="nope")
    for command in ("check", "serve"):
        done = appliance(command, str(project), cwd=tmp_path)
        assert done.returncode == EXIT_CONFIG, (command, done.stderr)
        assert "firmware profile 'nope' not found; known: auto, cpu, igpu, kserve, npu" in done.stderr
        assert done.stdout == ""


def test_check_and_serve_exit_69_when_the_profiles_device_is_absent(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "far.yaml").write_text("name: far\ndescription: a GPU no PC has\ndevice: GPU.42\n")
    project = write_project(tmp_path / "p", {"nodes": {"a": {"type": "crop@1", "x": 0, "y": 0, "width": 3,
                                                             "height": 3}}}, firmware_profile="far")
    for command in ("check", "serve"):
        done = appliance(command, str(project), cwd=tmp_path, env={"APPLIANCE_PROFILES_DIR": str(profiles)})
        assert done.returncode == EXIT_DEVICE_ABSENT, (command, done.stderr)
        assert "profile far: device GPU.42 not available" in done.stderr and done.stdout == ""


def test_the_unit_does_not_restart_on_the_config_exit_code() -> None:
    unit = (REPO / "systemd" / "appliance@.service").read_text()
    assert f"RestartPreventExitStatus={EXIT_CONFIG}" in unit


def test_export_problems_go_to_stderr_with_78(tmp_path: Path) -> None:
    broken = write_project(tmp_path / "broken", {"nodes": {"a": {"type": "crop@1", "widht": 3}}})
    done = appliance("export", str(broken), str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == EXIT_CONFIG and done.stdout == ""
    assert "unknown key (did you mean 'width'?)" in done.stderr and not (tmp_path / "out").exists()


def test_pekat_dist_writes_an_executable_launcher_for_this_python(tmp_path: Path) -> None:
    done = appliance("pekat-dist", "dist", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    launcher = tmp_path / "dist" / "pekat_vision" / "pekat_vision"
    assert os.access(launcher, os.X_OK)
    assert f"dist_path='{tmp_path / 'dist'}'" in done.stdout
    assert f"exec {sys.executable} -u -m appliance serve" in launcher.read_text()
    # As the client runs it, in PEKAT's spelling: a problem in the project comes back, with serve's exit code.
    broken = write_project(tmp_path / "broken", {"nodes": {"a": {"type": "crop@1", "widht": 3}}})
    run = subprocess.run([str(launcher), "-data", str(broken), "-port", str(free_port()), "-stop_key", "k"],
                         capture_output=True, text=True, cwd="/", timeout=120)
    assert run.returncode == EXIT_CONFIG and "unknown key (did you mean 'width'?)" in run.stderr


def test_train_refuses_a_version_that_exists_before_training(tmp_path: Path) -> None:
    from appliance.runtime.store import publish

    publish(tmp_path / "store", "parts", {"model.onnx": b"network"}, {"task": "anomaly", "input": {"size": [64, 64]}})
    (tmp_path / "good").mkdir()
    done = appliance("train", "anomaly", "--good", str(tmp_path / "good"), "--out", str(tmp_path / "store" / "parts"),
                     "--version", "1", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""  # refused before training, not after it
    assert done.stderr == (f"error: {tmp_path / 'store' / 'parts' / '1'} exists; versions are never overwritten: "
                           "pick another --version\n")
