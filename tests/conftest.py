"""Fixtures: real servers on 127.0.0.1 (the `appliance serve` process) and projects written to tmp folders."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent


def needs_tool(*commands: str) -> pytest.MarkDecorator:
    """Skip when a system tool is missing, except where CI installed it (`make test-tools` sets
    APPLIANCE_REQUIRE_TOOLS=1): there a missing tool fails instead of silently skipping."""
    missing = [command for command in commands if shutil.which(command) is None]
    required = os.environ.get("APPLIANCE_REQUIRE_TOOLS") == "1"
    return pytest.mark.skipif(bool(missing) and not required,
                              reason=f"needs {', '.join(missing)} (`make test-tools` installs them)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_project(folder: Path, flow: dict | str, *, hooks: dict[str, str] | None = None, **settings) -> Path:
    """A project folder with project.yaml, flow.yaml and hook modules, ready for `appliance serve`."""
    folder.mkdir(parents=True, exist_ok=True)
    flow_text = flow if isinstance(flow, str) else yaml.safe_dump(flow, sort_keys=False)
    (folder / "flow.yaml").write_text(textwrap.dedent(flow_text))
    config = {"name": settings.pop("name", "test"), "flow": "flow.yaml", **settings}
    (folder / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for module, source in (hooks or {}).items():
        (folder / "code").mkdir(exist_ok=True)
        (folder / "code" / f"{module}.py").write_text(textwrap.dedent(source))
    return folder


def slow_project(folder: Path, seconds: float, **settings) -> Path:
    """A project whose one Code node sleeps `seconds` per frame: busy workers without using the CPU."""
    hook = f"import time\ndef main(context):\n    time.sleep({seconds})\n"
    flow = {"nodes": {"h": {"type": "code@1", "module": "slow", **settings.pop("node", {})}}}
    return write_project(folder, flow, hooks={"slow": hook}, **settings)


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_file: Path
    stdout_lines: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(project: Path, *extra: str, log_file: Path | None = None, wait_ready: bool = True,
                 env: dict[str, str] | None = None, timeout: float = 60, log_level: str = "DEBUG") -> Server:
    for _ in range(3):
        try:
            return _start_server(project, *extra, log_file=log_file, wait_ready=wait_ready, env=env, timeout=timeout,
                                 log_level=log_level)
        except PortTaken:
            continue  # another process took the free port between our probe and the server's bind
    raise RuntimeError("no free port found in 3 tries")


class PortTaken(Exception):
    pass


def _start_server(project: Path, *extra: str, log_file: Path | None, wait_ready: bool, env: dict[str, str] | None,
                  timeout: float, log_level: str) -> Server:
    port = free_port()
    log_file = log_file or project / "server.log"
    command = [sys.executable, "-m", "appliance", "serve", str(project), "--host", "127.0.0.1", "--port", str(port),
               "--log-file", str(log_file), "--log-level", log_level, *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env={**os.environ, **(env or {})}, text=True)
    server = Server(process, port, log_file, [])
    marker = "STOP_INIT_MODEL" if wait_ready else "__SERVER_RUNNING__"
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            server.stdout_lines.append(line.rstrip("\n"))
            if marker in line:
                return server
        elif process.poll() is not None:
            break
    if process.poll() == 75:
        raise PortTaken()
    process.kill()
    stderr = process.stderr.read() if process.stderr else ""
    # The log says how far the start got (pytest removes tmp folders of older runs: keep it in the message).
    log_tail = log_file.read_text(errors="replace")[-3000:] if log_file.is_file() else "(no log file)"
    raise RuntimeError(f"server did not start: stdout={server.stdout_lines} stderr={stderr[-2000:]} "
                       f"log={log_tail}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """serve(project_dir, *args) starts a server and stops it after the test."""
    started: list[Server] = []

    def _serve(project: Path, *extra: str, **kwargs) -> Server:
        server = start_server(project, *extra, **kwargs)
        started.append(server)
        return server

    yield _serve
    for server in started:
        server.stop(signal.SIGKILL if server.process.poll() is None else signal.SIGTERM, timeout=5)
        for stream in (server.process.stdout, server.process.stderr):
            if stream:
                stream.close()


@pytest.fixture(scope="session")
def spots_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """projects/dark-spots (a Code-hook flow, no model), served once for the whole session."""
    log_file = tmp_path_factory.mktemp("spots") / "server.log"
    server = start_server(REPO / "projects" / "dark-spots", log_file=log_file)
    yield server
    server.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def wait_until_sent(server: Server, output: str, count: int, seconds: float = 10) -> dict:
    """The output's /health entry once it has counted ``count`` messages sent. A peer sees a message before the
    appliance has its acknowledgement (PUBACK, the HTTP answer, the write's reply) and counts it: wait for that."""
    deadline = time.monotonic() + seconds
    while True:
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"][output]
        if health["sent"] >= count or time.monotonic() > deadline:
            return health
        time.sleep(0.02)
