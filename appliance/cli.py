"""Command line: argument parsing only; the work is done by the modules it calls.

`appliance serve PROJECT_DIR` and PEKAT's own spelling (`-data DIR -port P -host H -stop_key K
[-disable_code [v]]`, as the pekat-vision-sdk launches a server, PROTOCOL.md 6) both work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
from pathlib import Path

from appliance import __version__
from appliance.errors import ConfigError, DeviceUnavailable

EXIT_CANT_CREATE = 73  # sysexits.h EX_CANTCREAT: the output folder cannot be written

_PEKAT_VALUE_FLAGS = {"-data": "project_dir", "-port": "--port", "-host": "--host", "-stop_key": "--stop-key",
                      "-gpu": "--gpu", "-api_key": None, "-password": None}
_PEKAT_BOOL_FLAGS = {"-disable_code": "--disable-code", "-tutorial_only": None}
_FALSE_WORDS = {"0", "false", "no", "off"}
_TRUE_WORDS = {"1", "true", "yes", "on"}


def translate_pekat_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """PEKAT's single-dash flags -> ours; returns (argv, warnings). Bool flags may carry a value (or none)."""
    out: list[str] = []
    warnings: list[str] = []
    project: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _PEKAT_VALUE_FLAGS and i + 1 < len(argv):
            value_target, value = _PEKAT_VALUE_FLAGS[arg], argv[i + 1]
            if value_target == "project_dir":
                project = [value]
            elif value_target is None:
                warnings.append(f"{arg} is ignored: the key comes from project.yaml")
            else:
                out += [value_target, value]
            i += 2
            continue
        if arg in _PEKAT_BOOL_FLAGS:
            word = argv[i + 1].strip().lower() if i + 1 < len(argv) else ""
            has_value = word in _FALSE_WORDS or word in _TRUE_WORDS
            i += 2 if has_value else 1
            enabled = not has_value or word in _TRUE_WORDS
            target = _PEKAT_BOOL_FLAGS[arg]
            if target is None:
                warnings.append(f"{arg} is ignored")
            elif enabled:
                out.append(target)
            continue
        out.append(arg)
        i += 1
    return project + out, warnings


def _serve(args: argparse.Namespace, warnings: list[str]) -> int:
    from appliance.project import Project
    from appliance.server.serve import serve_project
    from appliance.telemetry.logs import configure_logging

    project_dir = Path(args.project_dir)
    log_file = Path(args.log_file) if args.log_file else None
    configure_logging(args.log_level, log_file, args.log_max_bytes, args.log_backups)
    log = logging.getLogger("appliance.cli")
    for warning in warnings:
        log.warning(warning)
    try:
        project = Project.load(project_dir, code_allowed=not args.disable_code)
    except ConfigError as error:
        return _problems(error, "; not serving")
    host = args.host or project.config.host
    port = args.port or project.config.port
    code = asyncio.run(serve_project(project, host, port, args.stop_key))
    if project.stuck_hooks:
        # A stuck hook thread can never be joined, and interpreter exit would wait for it forever.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def _problems(error: ConfigError, outcome: str = "") -> int:
    """A project's problems on stderr; the exit code `serve` and `check` share: 69 for an absent device (the
    project may run on another PC), else 78 (EX_CONFIG: the project must change; systemd does not restart)."""
    from appliance.server.serve import EXIT_CONFIG, EXIT_DEVICE_ABSENT

    for problem in error.problems:
        print(problem, file=sys.stderr)
    print(f"{len(error.problems)} problem(s){outcome}", file=sys.stderr, flush=True)
    return EXIT_DEVICE_ABSENT if isinstance(error, DeviceUnavailable) else EXIT_CONFIG


def _check(args: argparse.Namespace) -> int:
    from appliance.project import Project

    try:
        project = Project.load(Path(args.project_dir), code_allowed=not args.disable_code)
    except ConfigError as error:
        return _problems(error)
    print(f"{project.name}: OK ({project.node_count} nodes, flow {project.files.flow_path.name})")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from appliance.config.profile import all_profiles, profiles_dir
    from appliance.runtime.devices import available_devices, device_name, place

    devices = available_devices()
    print("OpenVINO devices on this machine:")
    for device in devices:
        print(f"  {device:8} {device_name(device)}")
    print(f"\nFirmware profiles ({profiles_dir()}):")
    for name, profile in all_profiles().items():
        if isinstance(profile, list):
            print(f"  {name:6} invalid: " + "; ".join(str(p) for p in profile))
            continue
        placement = place(profile, devices)
        verdict = f"runs on {placement.device}" if placement.runnable else "cannot run here"
        print(f"  {name:6} {verdict}: {placement.reason}")
        if not placement.runnable:
            for need in profile.needs:
                print(f"         needs {need}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from appliance.project import Project
    from appliance.runtime.store import StoreError, point_current, read_current, versions

    try:
        project = Project.load(Path(args.project_dir))
    except ConfigError as error:
        return _problems(error)
    store = project.runtime.store
    if args.action == "list":
        for model_dir in sorted(p for p in store.glob("*") if p.is_dir() and not p.name.startswith((".", "_"))):
            print(f"{model_dir.name}: current {read_current(model_dir)}; versions "
                  f"{', '.join(versions(model_dir)) or 'none'}")
        return 0
    try:
        point_current(store, args.model, args.version)
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.model}: current -> {args.version} (a running server switches within 2 s)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from appliance.deploy import ExportError, export_project

    try:
        models_from = Path(args.models_from) if args.models_from else None
        for line in export_project(Path(args.project_dir), Path(args.destination), models_from):
            print(line)
    except ConfigError as error:
        return _problems(error, "; nothing exported")
    except (ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CANT_CREATE
    return 0


def _faces(args: argparse.Namespace) -> int:
    from appliance.errors import ApplianceError
    from appliance.faces_gallery import enrol_files

    try:
        count = enrol_files(Path(args.project_dir), args.name, [Path(image) for image in args.images])
    except ApplianceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 1
    print(f"{args.name.strip()}: {count} face descriptor(s) in the gallery (a running server uses them at once)")
    return 0


PEKAT_LAUNCHER = """#!/bin/sh
# Written by `appliance pekat-dist`: pekat-vision-sdk's Instance(project_path=..., dist_path=...) runs
# <dist_path>/pekat_vision/pekat_vision -data PROJECT -port P -host H -stop_key K; this starts the appliance
# (appliance {version}) with the same arguments, in PEKAT's spelling (docs/protocol.md).
exec {python} -u -m appliance serve "$@"
"""


def write_pekat_dist(dist_dir: Path) -> Path:
    """``dist_dir/pekat_vision/pekat_vision``, executable, running this interpreter's appliance; returns its path."""
    launcher = dist_dir / "pekat_vision" / "pekat_vision"
    launcher.parent.mkdir(parents=True, exist_ok=True)
    python = sys.executable  # not resolved: a venv's python is a link, and resolving it would leave the venv
    text = PEKAT_LAUNCHER.format(python=shlex.quote(python), version=__version__)
    staging = launcher.with_name(f".pekat_vision.{os.getpid()}")
    staging.write_text(text)
    staging.chmod(0o755)
    os.replace(staging, launcher)
    return launcher


def _pekat_dist(args: argparse.Namespace) -> int:
    dist_dir = Path(args.dist_dir).absolute()
    try:
        launcher = write_pekat_dist(dist_dir)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CANT_CREATE
    print(f"wrote {launcher}")
    print(f"launch a project from Python with pekat-vision-sdk:\n"
          f"    Instance(project_path='/path/to/project', dist_path='{dist_dir}')\n"
          f"(the project folder needs a pekat_package.json beside project.yaml)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Visual inspection appliance (PEKAT-compatible)")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve one project on its port")
    serve.add_argument("project_dir", help="the project folder (with project.yaml)")
    serve.add_argument("--host", help="address to bind (default: project.yaml host)")
    serve.add_argument("--port", type=int, help="port to bind (default: project.yaml port)")
    serve.add_argument("--stop-key", help="enables GET /stop?key=... with this key")
    serve.add_argument("--disable-code", action="store_true", help="refuse flows with Code hooks")
    serve.add_argument("--gpu", type=int, default=0, help=argparse.SUPPRESS)
    serve.add_argument("--log-file", help="write logs here instead of stderr")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    from appliance.telemetry.logs import log_backups, log_size
    serve.add_argument("--log-max-bytes", type=log_size, metavar="SIZE",
                       help="rotate --log-file at this size, e.g. 512K, 10M (default 10M; 0: never, for logrotate)")
    serve.add_argument("--log-backups", type=log_backups, metavar="N",
                       help="rotated --log-file copies to keep (default 5)")

    check = commands.add_parser("check", help="validate a project and its flow without serving",
                                description="Validate a project as `serve` would load it, without serving. Exit 0: "
                                            "OK; 78: the project has problems (listed on stderr); 69: its firmware "
                                            "profile's device is absent on this PC.")
    check.add_argument("project_dir", help="the project folder (with project.yaml)")
    check.add_argument("--disable-code", action="store_true", help="refuse flows with Code hooks, as serve would")

    commands.add_parser("devices", help="list OpenVINO devices and which firmware profiles can run here")

    models = commands.add_parser("models", help="list a project's models, or switch a model's current version")
    model_actions = models.add_subparsers(dest="action", required=True)
    listing = model_actions.add_parser("list", help="each model of the project's store: current and versions")
    listing.add_argument("project_dir", help="the project folder (with project.yaml)")
    switch = model_actions.add_parser("switch", help="point a model's `current` at a version (a running server "
                                                     "follows within 2 s)")
    switch.add_argument("project_dir", help="the project folder (with project.yaml)")
    switch.add_argument("model", help="the model's folder name in the store")
    switch.add_argument("version", help="a version folder of that model")

    export = commands.add_parser("export", help="copy a project with its flow and models into a folder of its "
                                                "own (e.g. /var/lib/appliance/NAME for systemd)")
    export.add_argument("project_dir", help="the project folder (with project.yaml)")
    export.add_argument("destination", help="an absent or empty folder")
    export.add_argument("--models-from", metavar="STORE", help="take the models the flow names from this store when "
                        "the project's shared store lacks them (systemd/install.sh: /opt/appliance/models)")

    pekat_dist = commands.add_parser(
        "pekat-dist", help="write the pekat_vision launcher that pekat-vision-sdk's "
                           "Instance(project_path=..., dist_path=DIR) starts",
        description="Write DIR/pekat_vision/pekat_vision, an executable that starts this appliance the way "
                    "pekat-vision-sdk launches PEKAT VISION: Instance(project_path=PROJECT, dist_path=DIR). "
                    "It runs this Python, so write it again after moving or recreating the venv.")
    pekat_dist.add_argument("dist_dir", metavar="DIR", help="the folder to pass as dist_path (created if absent)")

    faces = commands.add_parser("faces", help="the project's face gallery (identify@1)")
    face_actions = faces.add_subparsers(dest="action", required=True)
    enrol = face_actions.add_parser("enrol", help="add a person from photos (the largest face of each)")
    enrol.add_argument("project_dir")
    enrol.add_argument("name", help="the person's name, as identify@1 will answer it")
    enrol.add_argument("images", nargs="+", help="image files, one face each (the largest face is taken)")

    train = commands.add_parser("train", help="train a model on this machine",
                                description="Train a model on this machine; `appliance train TASK --help` lists "
                                            "the task's own options.")
    train.add_argument("task", choices=["anomaly", "segment"], help="anomaly: from good images (and optionally "
                       "bad ones with masks), --mode fast|thorough|bank; segment: a per-pixel classifier from "
                       "annotated masks")
    train.add_argument("rest", nargs=argparse.REMAINDER, metavar="...", help="the task's options")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pekat_style = any(arg in _PEKAT_VALUE_FLAGS or arg in _PEKAT_BOOL_FLAGS for arg in argv)
    warnings: list[str] = []
    if pekat_style:
        if argv and argv[0] == "serve":
            argv = argv[1:]
        argv, warnings = translate_pekat_args(argv)
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        if pekat_style and not args.log_file:
            # Launched by the PEKAT client: it stops reading our stdout+stderr pipe after the start
            # markers, and a full pipe would block the server, so logs go to a file.
            args.log_file = str(Path(args.project_dir) / "logs" / "appliance.log")
        return _serve(args, warnings)
    if args.command == "devices":
        return _devices(args)
    if args.command == "models":
        return _models(args)
    if args.command == "export":
        return _export(args)
    if args.command == "faces":
        return _faces(args)
    if args.command == "pekat-dist":
        return _pekat_dist(args)
    if args.command == "train":
        from appliance.training.cli import anomaly_main, segment_main

        return segment_main(args.rest) if args.task == "segment" else anomaly_main(args.rest)
    return _check(args)
