"""Log formats by destination: journald gets sd-daemon level prefixes, a terminal a human line, a pipe or file JSON
lines; `--log-file` rotates by size and count. Real `appliance serve` processes, their stderr a pipe or a pty."""

from __future__ import annotations

import json
import logging
import os
import pty
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from appliance.telemetry import logs
from tests.conftest import REPO, free_port, start_server, wait_for_marker, write_project

KEY = "Journal-Key-31"
FRAME = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
FIELDS = {"ts", "level", "logger", "msg", "project", "request_id", "endpoint", "api", "status", "duration_ms",
          "peer"}


@dataclass
class Launched:
    process: subprocess.Popen
    port: int
    stdout_lines: list[str]
    chunks: list[bytes] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr_text(self, until: str = "") -> str:
        """stderr so far, once the line with `until` is in it; all of it (to EOF) if the process has exited."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                assert self.reader is not None
                self.reader.join(max(0.0, deadline - time.monotonic()))
                break
            text = b"".join(self.chunks).decode(errors="replace")
            if until and "\n" in text.partition(until)[2]:  # its whole line is in
                break
            time.sleep(0.05)
        return b"".join(self.chunks).decode(errors="replace")


def _collect(fd: int, chunks: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: a pty whose other side closed
            chunk = b""
        if not chunk:
            os.close(fd)
            return
        chunks.append(chunk)


def launch(project: Path, stderr_write: int, stderr_read: int, env: dict[str, str], ready: bool = True) -> Launched:
    """`appliance serve` without --log-file, its stderr on `stderr_write`, collected from `stderr_read`; returns
    once it is ready (or, with `ready=False`, once it has exited)."""
    port = free_port()
    command = [sys.executable, "-m", "appliance", "serve", str(project), "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "DEBUG"]
    environ = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_write, cwd=REPO,
                               env={**environ, **env}, text=True)
    os.close(stderr_write)
    server = Launched(process, port, [])
    server.reader = threading.Thread(target=_collect, args=(stderr_read, server.chunks), daemon=True)
    server.reader.start()
    assert process.stdout is not None
    if not ready:
        process.wait(60)
        server.stdout_lines += process.stdout.read().splitlines()
        return server
    if wait_for_marker(process, "STOP_INIT_MODEL", 60, server.stdout_lines):
        return server
    process.kill()
    raise RuntimeError(f"server did not start: {server.stdout_lines} {b''.join(server.chunks)[-2000:]!r}")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path / "p", {"nodes": {"v": {"type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}},
                         name="journaled", api_key=KEY)


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """A hook module that fails on import: the server logs an ERROR with a traceback and exits 1."""
    hook = "raise FileNotFoundError('calibration.yaml is missing')\n\n\ndef main(context):\n    pass\n"
    return write_project(tmp_path / "b", {"nodes": {"h": {"type": "code@1", "module": "calibrated"}}},
                         hooks={"calibrated": hook}, name="broken")


@pytest.fixture
def launched() -> Iterator[list[Launched]]:
    servers: list[Launched] = []
    yield servers
    for server in servers:
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
        if server.process.stdout:
            server.process.stdout.close()


def traffic(url: str) -> dict[str, str]:
    """One served and one refused request; their X-Request-Id by kind."""
    served = requests.post(f"{url}/analyze_image", data=FRAME, headers={"X-API-Key": KEY})
    refused = requests.post(f"{url}/analyze_image?api_key=wrong-{KEY}&data=SERIAL-77", data=FRAME)
    assert (served.status_code, refused.status_code) == (200, 401)
    return {"served": served.headers["X-Request-Id"], "refused": refused.headers["X-Request-Id"]}


def journal_records(text: str) -> list[tuple[int, dict]]:
    """(priority, entry) of each log record; every record must carry its prefix."""
    records = []
    for line in text.splitlines():
        if '{"ts"' not in line:
            continue  # a plain print such as "appliance: serving ...", not a log record
        match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert match, f"log line without its level prefix: {line!r}"
        entry = json.loads(match.group(2))
        priority = int(match.group(1))
        assert priority == {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}[entry["level"]]
        records.append((priority, entry))
    return records


def journal_pipe() -> tuple[int, int, dict[str, str]]:
    """A pipe standing in for journald's stream socket, and the JOURNAL_STREAM that names it."""
    read, write = os.pipe()
    status = os.fstat(write)
    return read, write, {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}


def test_under_journald_each_line_carries_its_syslog_level(project: Path, launched: list[Launched]) -> None:
    read, write, env = journal_pipe()
    server = launch(project, write, read, env)
    launched.append(server)
    ids = traffic(server.url)
    text = server.stderr_text(until=ids["refused"])
    records = journal_records(text)
    by_id = {entry["request_id"]: (priority, entry) for priority, entry in records if "request_id" in entry}
    assert by_id[ids["served"]][0] == 7 and by_id[ids["refused"]][0] == 4
    assert FIELDS <= set(by_id[ids["refused"]][1]) and by_id[ids["refused"]][1]["status"] == 401
    assert (6, "serving project journaled on " + server.url) in [(p, e["msg"]) for p, e in records]
    assert KEY not in text and "SERIAL-77" not in text and "api_key=***&data=***" in text
    # The PEKAT client's markers on stdout stay exactly as they are.
    assert server.stdout_lines[-2:] == ["__SERVER_RUNNING__", "STOP_INIT_MODEL"]


def test_under_journald_a_failed_start_is_an_error_entry_with_its_traceback(broken: Path,
                                                                           launched: list[Launched]) -> None:
    read, write, env = journal_pipe()
    server = launch(broken, write, read, env, ready=False)
    launched.append(server)
    assert server.process.returncode == 1
    text = server.stderr_text()
    errors = [entry for priority, entry in journal_records(text) if priority == 3]
    assert [entry["msg"] for entry in errors] == ["preparing the flow's nodes failed"]
    # The traceback is inside the one line, so it stays one journal entry at priority 3.
    assert "FileNotFoundError: calibration.yaml is missing" in errors[0]["traceback"]
    assert not [line for line in text.splitlines() if line.startswith(("Traceback", "  File"))]


def test_journal_stream_of_another_file_means_plain_json(project: Path, launched: list[Launched],
                                                         tmp_path: Path) -> None:
    # systemd exports JOURNAL_STREAM to children whose stderr may have been redirected: the stream decides.
    other = os.stat(tmp_path)
    read, write = os.pipe()
    server = launch(project, write, read, {"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"})
    launched.append(server)
    ids = traffic(server.url)
    records = [line for line in server.stderr_text(until=ids["refused"]).splitlines() if '{"ts"' in line]
    assert records and all(line.startswith('{"ts"') for line in records)
    refused = [json.loads(line) for line in records if ids["refused"] in line]
    assert refused[0]["level"] == "WARNING" and refused[0]["status"] == 401


def test_a_terminal_gets_one_readable_line_per_record(project: Path, launched: list[Launched]) -> None:
    master, slave = pty.openpty()
    server = launch(project, slave, master, {})
    launched.append(server)
    ids = traffic(server.url)
    lines = server.stderr_text(until=ids["refused"]).replace("\r\n", "\n").splitlines()
    assert not [line for line in lines if line.startswith(("{", "<"))]
    refused = [line for line in lines if ids["refused"] in line]
    assert len(refused) == 1, lines
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
    assert re.fullmatch(rf"{stamp} WARNING appliance\.server: POST /analyze_image 401  project=journaled "
                        rf"request_id={ids['refused']} api=pekat [\d.]+ ms peer=127\.0\.0\.1 "
                        r"query=api_key=\*\*\*&data=\*\*\*", refused[0]), refused[0]
    served = [line for line in lines if ids["served"] in line]
    assert re.match(rf"{stamp} DEBUG   appliance\.server: POST /analyze_image 200 ", served[0])
    assert KEY not in "\n".join(lines) and "SERIAL-77" not in "\n".join(lines)


def test_on_a_terminal_a_traceback_follows_its_line(broken: Path, launched: list[Launched]) -> None:
    master, slave = pty.openpty()
    server = launch(broken, slave, master, {}, ready=False)
    launched.append(server)
    lines = server.stderr_text().replace("\r\n", "\n").splitlines()
    failure = next(i for i, line in enumerate(lines)
                   if re.fullmatch(r"\S+ \S+ ERROR   appliance\.serve: preparing the flow's nodes failed", line))
    assert lines[failure + 1] == "Traceback (most recent call last):"
    assert "FileNotFoundError: calibration.yaml is missing" in lines[failure + 2:]


def test_log_file_rotates_by_size_and_keeps_the_count(tmp_path: Path) -> None:
    project = write_project(tmp_path / "r", {"nodes": {"v": {"type": "evaluate@1", "rules": [
        {"rule": "no_rectangles"}]}}}, name="rotated")
    log_file = tmp_path / "logs" / "appliance.log"
    server = start_server(project, "--log-max-bytes", "2K", "--log-backups", "2", log_file=log_file)
    try:
        ids = [requests.post(f"{server.url}/analyze_image", data=FRAME).headers["X-Request-Id"] for _ in range(40)]
    finally:
        code = server.stop()
    sizes = {path.name: path.stat().st_size for path in log_file.parent.iterdir()}
    assert code == 0, (code, sizes, server.process.stderr.read() if server.process.stderr else "")
    files = sorted(sizes)
    assert files == ["appliance.log", "appliance.log.1", "appliance.log.2"], sizes
    entries = []
    for name in files:
        text = (log_file.parent / name).read_text()
        assert len(text.encode()) <= 2048, text
        entries += [json.loads(line) for line in text.splitlines()]
    kept = {entry.get("request_id") for entry in entries}
    assert ids[-1] in kept and ids[0] not in kept  # the newest are kept, the oldest rotated away
    assert any(entry["msg"].startswith("stopping") for entry in entries)


def test_log_max_bytes_zero_leaves_rotation_to_logrotate(tmp_path: Path) -> None:
    """With 0 the file is never rotated here, and is reopened after logrotate moves it (WatchedFileHandler)."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    log_file = tmp_path / "a.log"
    try:
        logs.configure_logging("INFO", log_file, max_bytes=0)
        logging.getLogger("t").info("before %s", "x" * 5000)
        log_file.rename(tmp_path / "a.log.1")
        logging.getLogger("t").warning("after")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
    assert json.loads(log_file.read_text())["msg"] == "after"
    assert json.loads((tmp_path / "a.log.1").read_text())["msg"].startswith("before")


def test_rotation_flags_are_checked_before_serving(tmp_path: Path) -> None:
    assert [logs.log_size(text) for text in ("0", "1048576", "512K", "10M", "1G", "10MiB")] == [
        0, 1048576, 512 * 1024, 10 * 1024 ** 2, 1024 ** 3, 10 * 1024 ** 2]
    for flags, complaint in ((["--log-backups", "0"], "at least 1"), (["--log-max-bytes", "ten"], "not a size")):
        run = subprocess.run([sys.executable, "-m", "appliance", "serve", str(tmp_path), *flags], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and complaint in run.stderr and not run.stdout


def test_syslog_priorities_follow_sd_daemon() -> None:
    assert [logs.syslog_priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                                      logging.CRITICAL)] == [7, 6, 4, 3, 2]
