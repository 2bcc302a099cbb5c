"""Fixtures: real servers on 127.0.0.1 (the `appliance serve` process, or the same application served in this
process for handler logic) and projects written to tmp folders."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
import yaml

if TYPE_CHECKING:
    from aiohttp import web

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


def wait_for_marker(process: subprocess.Popen, marker: str, timeout: float, lines: list[str]) -> bool:
    """Read the process's stdout until a line holds ``marker`` (True), it exits or ``timeout`` passes (False);
    every line read is appended to ``lines``.

    Bytes straight from the pipe, never through the text wrapper: its readline() reads ahead whatever is in the
    pipe, and when both launch markers arrived before we woke (a fast start on a busy machine), STOP_INIT_MODEL sat
    in its buffer while select() on the empty pipe saw nothing more, and the start "hung" for the whole timeout."""
    assert process.stdout is not None
    stdout = process.stdout.fileno()
    pending = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdout], [], [], 0.2)
        if ready:
            chunk = os.read(stdout, 65536)
            if not chunk:  # end of the output: the process has exited, or is exiting
                if process.poll() is not None:
                    return False
                time.sleep(0.05)
                continue
            *complete, pending = (pending + chunk).split(b"\n")
            lines += [line.decode(errors="replace") for line in complete]
            if any(marker in line for line in lines):
                return True
        elif process.poll() is not None:
            return False
    return False


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
    if wait_for_marker(process, marker, timeout, server.stdout_lines):
        return server
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


class InProcessServer:
    """A project's application served in this process on 127.0.0.1, built and made ready as `appliance serve`
    builds it (server/serve.py), without what only a process has: the launch markers on stdout, signals (stop,
    SIGHUP reload), systemd notify and the watchdog, exit codes. Its event loop runs in a thread of its own, so
    the real clients (requests, curl, deepomatic-api, tritonclient) talk to it over a real socket, byte for byte
    as to a process. What it saves: the interpreter start and the imports (about 3 s a server here), and most of
    each model's compile: every in-process server of the session shares one OpenVINO model cache, as the servers
    of one machine share systemd's CACHE_DIRECTORY (a warm cache halves a vision project's preparation)."""

    def __init__(self, project_dir: Path, log_file: Path, log_level: str) -> None:
        self.project_dir = project_dir
        self.log_file = log_file
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="in-process-server", daemon=True)
        # The file gets the JSON lines `--log-file` writes, from this process's appliance and aiohttp loggers only
        # (the test's own clients log URLs with their keys through urllib3: never into this file).
        self._log_handler = _server_log_handler(log_file)
        self._loggers = [logging.getLogger(name) for name in ("appliance", "aiohttp")]
        self._log_levels = [logger.level for logger in self._loggers]
        for logger in self._loggers:
            logger.addHandler(self._log_handler)
            logger.setLevel(log_level)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self):  # type: ignore[no-untyped-def]
        assert self._runner is not None
        return self._runner.app

    @property
    def state(self):  # type: ignore[no-untyped-def]
        """The server's ServerState (read it; it belongs to the server's event loop)."""
        from appliance.server.core import STATE

        return self.app[STATE]

    def log_text(self) -> str:
        self._log_handler.flush()
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def serving(self) -> bool:
        """The event loop runs and the socket still accepts (a crash in a handler must not take either down)."""
        if not self._thread.is_alive():
            return False
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        except OSError:
            return False
        return True

    def start(self, stop_key: str | None, workers: int | None, ready: bool, code_allowed: bool,
              timeout: float) -> None:
        from appliance.project import Project

        with pytest.MonkeyPatch.context() as environment:  # read once, when the project loads
            environment.setenv("CACHE_DIRECTORY", str(_shared_model_cache()))
            environment.delenv("XDG_CACHE_HOME", raising=False)
            project = Project.load(self.project_dir, code_allowed=code_allowed)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(project, stop_key, workers, ready), self._loop).result(timeout)

    async def _serve(self, project, stop_key: str | None, workers: int | None,  # type: ignore[no-untyped-def]
                     ready: bool) -> None:
        """serve.py's `serve_project` up to STOP_INIT_MODEL, on a port the kernel chooses (no race for it)."""
        from aiohttp import web

        from appliance.server.app import create_app
        from appliance.server.core import STATE, mark_ready
        from appliance.server.serve import CLOSE_GRACE_S
        from appliance.threads import started_pool

        app = create_app(project, stop_key=stop_key, workers=workers)
        runner = self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                              shutdown_timeout=CLOSE_GRACE_S)
        await runner.setup()
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        self.port = listening.getsockname()[1]
        await web.SockSite(runner, listening).start()
        loop = asyncio.get_running_loop()
        loop.set_default_executor(started_pool(2, "runtime"))
        if not ready:
            return  # as while the flow's models compile: every inspection answers 503 `not ready`
        await loop.run_in_executor(None, project.prepare)
        mark_ready(app[STATE])

    def stop(self) -> None:
        """aiohttp's cleanup as at the end of serve.py: the dialects, outputs and sources stop, the project's
        models are released."""
        try:
            if self._runner is not None and self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
                asyncio.run_coroutine_threadsafe(_end_remaining_tasks(), self._loop).result(30)
        finally:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(30)
            if not self._loop.is_running():
                self._loop.run_until_complete(self._loop.shutdown_default_executor())
                self._loop.close()
            for logger, level in zip(self._loggers, self._log_levels, strict=True):
                logger.removeHandler(self._log_handler)
                logger.setLevel(level)
            self._log_handler.close()


async def _end_remaining_tasks() -> None:
    """What asyncio.run does before it closes its loop: a connection's handler still waiting for its next request
    (a client's keep-alive) is cancelled and awaited, not destroyed pending."""
    current = asyncio.current_task()
    remaining = [task for task in asyncio.all_tasks() if task is not current]
    for task in remaining:
        task.cancel()
    await asyncio.gather(*remaining, return_exceptions=True)


_model_cache: Path | None = None


def _shared_model_cache() -> Path:
    global _model_cache
    if _model_cache is None:
        _model_cache = Path(tempfile.mkdtemp(prefix="appliance-tests-cache-"))
    return _model_cache


def shared_model_cache_env() -> dict[str, str]:
    """start_server(..., env=shared_model_cache_env()): a process that shares the in-process servers' model cache,
    where what is tested is not the compile (a restart that must keep a project's state, say)."""
    return {"CACHE_DIRECTORY": str(_shared_model_cache())}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _model_cache is not None:
        shutil.rmtree(_model_cache, ignore_errors=True)


def _server_log_handler(log_file: Path) -> logging.Handler:
    from appliance.telemetry.logs import JsonFormatter, ParserErrorFilter, file_handler

    handler = file_handler(log_file)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ParserErrorFilter())
    return handler


def start_in_process(project: Path, *, stop_key: str | None = None, workers: int | None = None, ready: bool = True,
                     code_allowed: bool = True, log_file: Path | None = None, log_level: str = "DEBUG",
                     timeout: float = 120) -> InProcessServer:
    """Serve ``project`` in this process (InProcessServer); ``ready=False`` leaves the flow unprepared, as a
    server is while its models compile. Stop it with ``.stop()``."""
    server = InProcessServer(project, log_file or project / "server.log", log_level)
    try:
        server.start(stop_key, workers, ready, code_allowed, timeout)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def serve_in_process() -> Iterator:
    """serve_in_process(project_dir, **options) serves the project in this process and stops it after the test."""
    started: list[InProcessServer] = []

    def _serve(project: Path, **options) -> InProcessServer:
        server = start_in_process(project, **options)
        started.append(server)
        return server

    yield _serve
    for server in started:
        server.stop()


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
