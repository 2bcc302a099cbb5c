"""RELIABILITY 8-13 against real servers: deadlines, disconnects, draining, second signals, drain timeouts, start-up
faults, model swaps and the systemd watchdog. Cases covered elsewhere are not repeated here."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import requests
import yaml
from openvino import opset13 as ops

from appliance.runtime.store import switch_current, write_manifest
from tests.conftest import REPO, slow_project, write_project
from tests.nodes.test_anomaly import FLOW, frame, save_red_detector
from tests.server.test_protocol import part_image, png
from tests.server.test_reliability import error_of

BODY = png(part_image(False, 16, 16))


@pytest.fixture
def two_versions(tmp_path, serve):
    """A served project whose model `red` has versions 1 and 2, 1 current."""
    project = write_project(tmp_path / "p", FLOW, api_key="k")
    save_red_detector(project / "models", "2", threshold=2.0)
    save_red_detector(project / "models", "1", threshold=0.5)
    return project, serve(project)


def keep_alive(server) -> http.client.HTTPConnection:
    """A connection that has answered one request and stays open (HTTP/1.1 keep-alive)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/ping")
    assert connection.getresponse().read() == b"pong"
    return connection


def metric(text: str, series: str) -> float:
    """The value of one series of a /metrics page, written as Prometheus prints it; 0 when absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def counting_project(folder: Path, seconds: float, **settings) -> Path:
    """Like slow_project, but each hook run appends a line to ran.txt: proof of which requests ran."""
    project = slow_project(folder, seconds, **settings)
    (project / "code" / "slow.py").write_text(
        "import time\n"
        f"def main(context):\n    open({str(project / 'ran.txt')!r}, 'a').write(context['data'] + '\\n')\n"
        f"    time.sleep({seconds})\n")
    return project


def test_8_2_a_request_past_its_queue_deadline_gets_503_and_never_runs(tmp_path, serve):
    project = counting_project(tmp_path / "p", 1.5, limits={"queue_timeout_s": 0.5, "queue_depth": 8})
    server = serve(project)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(requests.post, f"{server.url}/analyze_image?data=busy{i}", data=BODY) for i in range(2)]
        time.sleep(0.3)  # both workers are in the hook now
        late = requests.post(f"{server.url}/analyze_image?data=late", data=BODY)
        assert [f.result().status_code for f in busy] == [200, 200]
    assert error_of(late) == (503, "deadline exceeded: waited 0.5 s in queue")
    assert "late" not in (project / "ran.txt").read_text()
    assert 'appliance_rejected_requests_total{reason="deadline"} 1.0' in requests.get(f"{server.url}/metrics").text


def burst(url: str, body: bytes, seconds: float, clients: int = 32) -> set[int]:
    """`clients` cameras sending full-HD frames as fast as they are answered, for `seconds`."""
    stop = time.monotonic() + seconds

    def camera(_: int) -> set[int]:
        statuses = set()
        with requests.Session() as session:
            while time.monotonic() < stop:
                statuses.add(session.post(f"{url}/analyze_image", data=body, timeout=30).status_code)
        return statuses

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return set().union(*pool.map(camera, range(clients)))


def test_8_5_after_a_burst_the_gauges_return_to_zero_and_memory_to_its_level(tmp_path, serve):
    from tests.server.test_leaks import process_counts

    # Full-HD frames: each one decoded is 6 MB, and the hook works on a copy, so retained frames would show.
    server = serve(slow_project(tmp_path / "p", 0.05))
    body = png(part_image(True))
    # Warm-up with the same burst: pools, caches and malloc arenas reach the size such a burst needs.
    assert burst(server.url, body, 4.0) == {200, 503}
    time.sleep(0.5)
    rss_before = process_counts(server.process.pid)[2]
    assert burst(server.url, body, 4.0) == {200, 503}  # more than the queue holds: some are refused
    time.sleep(0.5)
    metrics = requests.get(f"{server.url}/metrics").text
    assert metric(metrics, "appliance_in_flight_requests") == 0 and metric(metrics, "appliance_queue_depth") == 0
    rss_after = process_counts(server.process.pid)[2]
    assert rss_after <= rss_before * 1.10, f"RSS {rss_before // 1024} MiB before, {rss_after // 1024} MiB after"


def rendezvous_project(folder: Path, seconds: float, **settings) -> Path:
    """A hook that sleeps `seconds`, except for frames whose data is `meet N`: those wait (up to 5 s) until N of
    them are inside the hook at the same time, and answer `met: N` only if they all were. N such frames sent at
    once all meet only if N worker slots are free."""
    hook = f"""
import os, time
def main(context):
    data = context["data"]
    if not data.startswith("meet "):
        time.sleep({seconds})
        return
    wanted = int(data.split()[1])
    folder = {str(folder / "met")!r}
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, str(time.monotonic_ns())), "w").close()
    deadline = time.monotonic() + 5
    while len(os.listdir(folder)) < wanted and time.monotonic() < deadline:
        time.sleep(0.01)
    context["met"] = len(os.listdir(folder))
"""
    return write_project(folder, {"nodes": {"h": {"type": "code@1", "module": "meet", "timeout_s": 10}}},
                         hooks={"meet": hook}, **settings)


def cut_request(port: int, phase: str, delay: float) -> None:
    """One frame whose client goes away: during the upload, after `delay` s waiting for the answer."""
    head = b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if phase == "upload":
            sock.sendall(head + BODY[: int(len(BODY) * delay)])
        else:
            sock.sendall(head + BODY)
            time.sleep(delay)
        # Reset, not FIN: the server learns at once that nobody is reading.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_9_1_to_9_3_two_hundred_cut_requests_leave_nothing_behind(tmp_path, serve):
    from tests.server.test_leaks import process_counts

    # Slots: one per core for a flow without a model; the hook pool runs at most 4 at once (nodes/code.py).
    slots = min(4, os.cpu_count() or 1)
    server = serve(rendezvous_project(tmp_path / "p", 0.1, limits={"queue_depth": 64}), log_level="DEBUG")
    with requests.Session() as session:
        for _ in range(10):
            assert session.post(f"{server.url}/analyze_image", data=BODY).status_code == 200
    fds_before = process_counts(server.process.pid)[0]
    chooser = random.Random(93)
    cuts = [(chooser.choice(["upload", "queued", "inference"]), chooser.random()) for _ in range(200)]
    plan = [(phase, fraction if phase == "upload" else 0.02 + 0.1 * fraction if phase == "queued"
             else 0.12 + 0.2 * fraction) for phase, fraction in cuts]
    # Eight clients at once on `slots` workers: cut requests are queued behind each other or in the hook.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda cut: cut_request(server.port, *cut), plan))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # Status codes only: a kept Response object keeps its connection open, and the server's socket with it.
        normal = list(pool.map(lambda _: requests.post(f"{server.url}/analyze_image", data=BODY,
                                                       timeout=30).status_code, range(100)))
    assert normal == [200] * 100
    metrics = requests.get(f"{server.url}/metrics").text
    assert metric(metrics, "appliance_in_flight_requests") == 0 and metric(metrics, "appliance_queue_depth") == 0
    for phase in ("upload", "queued", "inference"):
        assert metric(metrics, f'appliance_client_disconnects_total{{phase="{phase}"}}') > 0, phase
    # Every slot is free again: `slots` frames sent at once are all inside the hook at the same time.
    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
        met = list(pool.map(lambda _: requests.post(f"{server.url}/analyze_image", params={"data": f"meet {slots}"},
                                                     data=BODY, timeout=30).json()["met"], range(slots)))
    assert met == [slots] * slots
    assert abs(process_counts(server.process.pid)[0] - fds_before) <= 2
    log_lines = server.log_text().splitlines()
    assert not [line for line in log_lines if '"level": "ERROR"' in line or "Traceback" in line]


def test_10_1_and_8_4_during_the_drain_new_work_is_refused_and_in_flight_work_finishes(tmp_path, serve):
    server = serve(slow_project(tmp_path / "p", 2.5, limits={"queue_depth": 8}))
    # Connections opened before the signal: two keep-alive ones, idle when it comes, and an upload half sent.
    probe, late_camera = (keep_alive(server) for _ in range(2))
    upload = socket.create_connection(("127.0.0.1", server.port))
    upload.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY)
                   + BODY[:100])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(requests.post, f"{server.url}/analyze_image", data=BODY) for _ in range(2)]
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # (2) Still listening for a moment: a new client learns why it is refused.
        refused = requests.post(f"{server.url}/analyze_image", data=BODY)
        ready = requests.get(f"{server.url}/health/ready")
        time.sleep(1.2)
        # (3) Then the listener is closed while the two slow requests are still running ...
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/ping", timeout=2)
        # ... but connections that were open stay served: an upload in progress reaches the queue and is
        # refused there, and a request on an idle keep-alive connection gets 503 and `Connection: close`.
        upload.sendall(BODY[100:])
        uploaded = http.client.HTTPResponse(upload)
        uploaded.begin()
        late_camera.request("POST", "/analyze_image", body=BODY)
        late = late_camera.getresponse()
        late_body = late.read()
        probe.request("GET", "/health/ready")
        ready_late = probe.getresponse()
        ready_late.read()
        probe.request("GET", "/metrics")
        metrics = probe.getresponse().read().decode()
        # (4) The requests in flight finish within the drain.
        assert [f.result().status_code for f in slow] == [200, 200]
    assert error_of(refused) == (503, "shutting down") and refused.headers["Connection"] == "close"
    assert error_of(ready) == (503, "not ready: shutting down")
    assert (uploaded.status, uploaded.getheader("Connection")) == (503, "close")
    assert json.loads(uploaded.read())["message"] == "shutting down"
    assert (late.status, late.getheader("Connection")) == (503, "close")
    assert json.loads(late_body) == {"status": 503, "message": "shutting down", "data": None}
    assert ready_late.status == 503
    assert metric(metrics, 'appliance_rejected_requests_total{reason="draining"}') == 3
    # (5) Exit 0.
    assert server.process.wait(10) == 0
    for connection in (probe, late_camera):
        connection.close()
    upload.close()


def four_requests(url: str) -> list:
    """Four frames posted from threads: on a 2-slot server two run and two wait in the queue."""
    answers: list = []

    def post() -> None:
        try:
            answers.append(requests.post(f"{url}/analyze_image", data=BODY, timeout=60).status_code)
        except requests.ConnectionError:
            answers.append("closed")

    for _ in range(4):
        threading.Thread(target=post, daemon=True).start()
    return answers


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_10_4_a_second_signal_during_the_drain_exits_at_once_with_1(tmp_path, serve, second):
    server = serve(slow_project(tmp_path / "p", 30.0, node={"timeout_s": 60}))
    answers = four_requests(server.url)
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    server.process.send_signal(second)
    # At once: long before the 30 s hooks or the 20 s drain could end.
    assert server.process.wait(5) == 1
    assert "exiting now, abandoning 4 requests" in server.log_text()
    deadline = time.monotonic() + 5
    while len(answers) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answers == ["closed"] * 4


def test_10_5_the_drain_timeout_ends_the_wait_exit_0_and_says_what_was_abandoned(tmp_path, serve):
    server = serve(slow_project(tmp_path / "p", 30.0, node={"timeout_s": 60}, limits={"drain_timeout_s": 1.0}))
    answers = four_requests(server.url)
    time.sleep(0.5)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    # Exit 0 after the drain time (plus margin), not after the hooks' 30 s: the worker threads still sleeping in
    # them do not hold the exit.
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < 1.0 + 2.0
    assert "drain timeout of 1 s reached: abandoned 4 requests" in server.log_text()
    deadline = time.monotonic() + 5
    while len(answers) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answers == ["closed"] * 4  # the remaining connections were closed


def test_10_6_sigterm_lets_four_slow_requests_finish_then_exits_0(tmp_path, serve):
    project = slow_project(tmp_path / "p", 1.0, limits={"queue_depth": 8})
    server = serve(project)
    # The row's 1 s assumes the 4 requests run at once. The server has one worker slot per core (no model in this
    # flow), so on fewer than 4 cores they take ceil(4 / slots) rounds of 1 s.
    rounds = math.ceil(4 / min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(requests.post, f"{server.url}/analyze_image", data=BODY) for _ in range(4)]
        time.sleep(0.3)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        try:
            late: int | str = requests.post(f"{server.url}/analyze_image", data=BODY, timeout=5).status_code
        except requests.ConnectionError:
            late = "refused"
        assert [f.result().status_code for f in slow] == [200, 200, 200, 200]
    assert late in (503, "refused")
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < rounds * 1.0 + 1.0


def run_serve(project: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`appliance serve` expected to stop by itself (a start-up fault)."""
    return subprocess.run([sys.executable, "-m", "appliance", "serve", str(project), "--host", "127.0.0.1", *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_11_1_a_taken_port_fails_fast_with_75_before_any_node_is_prepared(tmp_path):
    # Preparing this project takes 30 s (the hook module sleeps on import): exiting well before proves the bind
    # comes first.
    project = write_project(tmp_path / "p", {"nodes": {"h": {"type": "code@1", "module": "slow_import"}}},
                            hooks={"slow_import": "import time\ntime.sleep(30)\ndef main(context):\n    pass\n"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run_serve(project, "--port", str(port))
    assert result.returncode == 75
    assert time.monotonic() - started < 15
    assert f"port {port} on 127.0.0.1 is already in use (another project or PEKAT instance?)" in result.stderr
    assert "Traceback" not in result.stderr
    # The line the PEKAT client matches (PROTOCOL.md 6).
    assert "OSError: [Errno 48] Address already in use" in result.stdout


def test_11_2_a_missing_model_file_stops_the_start_with_78(tmp_path):
    project = write_project(tmp_path / "p", FLOW)
    save_red_detector(project / "models")
    (project / "models" / "red" / "1" / "model.xml").unlink()
    result = run_serve(project, "--port", "0")
    assert result.returncode == 78
    # RELIABILITY asks for `model 'red' version 1: models/red/1/model.xml not found`; the store reports the
    # version's files against its manifest instead (appliance/runtime/store.py), which names the file too.
    (problem,) = [line for line in result.stderr.splitlines() if "flow.yaml" in line]
    assert "nodes.anomaly.model:" in problem and "red/1" in problem and "'model.xml'" in problem


@pytest.mark.parametrize("damage, reason", [
    ("bad_xml", "Unable to read the model"),
    ("truncated_bin", "Incorrect weights in bin file!"),
])
def test_11_3_a_corrupt_model_with_a_valid_manifest_gives_openvinos_reason_and_78(tmp_path, damage, reason):
    """The sha256 case is in tests/nodes/test_anomaly.py; here the manifest matches the damaged files."""
    project = write_project(tmp_path / "p", FLOW)
    save_red_detector(project / "models")
    version = project / "models" / "red" / "1"
    if damage == "bad_xml":
        (version / "model.xml").write_text("<net><layers>")
    else:
        (version / "model.bin").write_bytes((version / "model.bin").read_bytes()[:10])
    write_manifest(version)
    result = run_serve(project, "--port", "0")
    assert result.returncode == 78
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("model 'red' version 1:")]
    assert line.startswith("model 'red' version 1: cannot compile on CPU: ") and reason in line
    assert "Exception from src" not in line


def test_11_7_an_invalid_project_yaml_lists_every_problem_with_its_line_and_exits_78(tmp_path):
    project = write_project(tmp_path / "p", {"nodes": {"f": {"type": "flip@1", "direction": "both"}}})
    (project / "project.yaml").write_text("name: bad\nflow: flow.yaml\nport: 70000\napi_key: ''\n"
                                          "limits:\n  queue_depht: 3\n")
    result = run_serve(project)
    assert result.returncode == 78
    where = str(project / "project.yaml")
    assert result.stderr.splitlines() == [
        f"{where}:3:7 port: Input should be less than or equal to 65535",
        f"{where}:4:10 api_key: api_key is empty; remove the key to serve without one, or set a real key",
        f"{where}:6:3 limits.queue_depht: unknown key (did you mean 'queue_depth'?)",
        "3 problem(s); not serving",
    ]
    assert "__SERVER_RUNNING__" not in result.stdout


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records every message with its arrival time."""

    def __init__(self, path: Path):
        self.address = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.address)
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._open = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while self._open:
            try:
                self.messages.append((time.monotonic(), self.socket.recv(4096).decode()))
            except TimeoutError:
                continue
            except OSError:
                return

    def pings(self, since: float = 0.0, until: float = math.inf) -> list[float]:
        return [t for t, m in list(self.messages) if m == "WATCHDOG=1" and since <= t <= until]

    def wait_for(self, predicate, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert predicate(), self.messages

    def close(self) -> None:
        self._open = False
        self._reader.join()
        self.socket.close()


@pytest.fixture
def notify(tmp_path):
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_11_8_a_slow_start_asks_systemd_for_more_time_every_10_s_and_is_ready_only_after(tmp_path, serve, notify):
    # Preparing the flow takes 10.5 s: the hook module sleeps on import, as a long first compile would.
    project = write_project(tmp_path / "p", {"nodes": {"h": {"type": "code@1", "module": "slow_import",
                                                             "next": ["roi"]}, **FLOW["nodes"]}},
                            hooks={"slow_import": "import time\ntime.sleep(10.5)\ndef main(context):\n    pass\n"})
    save_red_detector(project / "models")
    server = serve(project, wait_ready=False, env={"NOTIFY_SOCKET": notify.address})
    notify.wait_for(lambda: any(m.startswith("READY=1") for _, m in notify.messages), timeout=60)
    ready_at = next(t for t, m in notify.messages if m.startswith("READY=1"))
    extends = [t for t, m in notify.messages if m == "EXTEND_TIMEOUT_USEC=20000000"]
    assert len(extends) == 2 and 9.0 <= extends[1] - extends[0] <= 11.0
    assert ready_at - extends[0] >= 10.0
    assert [m for _, m in notify.messages if not m.startswith("EXTEND")][0].startswith("READY=1")
    # READY=1 means ready: the model is compiled and warmed up, and the first frame is served at once.
    assert requests.get(f"{server.url}/health/ready").status_code == 200
    assert requests.post(f"{server.url}/analyze_image", data=frame((0, 0, 255))).json()["result"] is False


def watched(tmp_path, serve, notify, hook: str, **settings):
    """A server with a 1 s watchdog (pings every 0.5 s) whose only node is `hook`, after its first two pings."""
    project = write_project(tmp_path / "p", {"nodes": {"h": {"type": "code@1", "module": "h",
                                                             **settings.pop("node", {})}}},
                            hooks={"h": hook}, **settings)
    server = serve(project, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"})
    notify.wait_for(lambda: len(notify.pings()) >= 2)
    return server


def test_13_5_a_pool_busy_past_watchdogsec_stops_the_pings_until_work_completes_again(tmp_path, serve, notify):
    hook = "import time\ndef main(context):\n    time.sleep(3.5)\n"
    server = watched(tmp_path, serve, notify, hook, node={"timeout_s": 10})
    workers = os.cpu_count() or 1  # one worker per core for a flow without a model: every one of them busy
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        busy_from = time.monotonic()
        answers = [pool.submit(requests.post, f"{server.url}/analyze_image", data=BODY) for _ in range(workers)]
        time.sleep(2.5)
        # The event loop itself is fine: only the workers make no progress.
        assert requests.get(f"{server.url}/ping", timeout=1).status_code == 200
        assert [f.result().status_code for f in answers] == [200] * workers
    done = time.monotonic()
    notify.wait_for(lambda: len(notify.pings(since=done)) >= 2, timeout=5)
    # No worker progress for WatchdogSec (1 s): no ping (one may have left just as the frames arrived).
    assert notify.pings(since=busy_from + 0.6, until=busy_from + 3.3) == []


def test_13_5_stuck_hooks_at_the_limit_stop_the_pings_for_good(tmp_path, serve, notify):
    hook = "import time\ndef main(context):\n    time.sleep(60)\n"
    server = watched(tmp_path, serve, notify, hook, node={"timeout_s": 0.2}, limits={"max_stuck_hooks": 2})
    for _ in range(2):
        assert requests.post(f"{server.url}/analyze_image", data=BODY).json()["result"] is False
    stuck_at = time.monotonic()
    time.sleep(3.0)
    # The workers are idle and the loop answers, but systemd must restart the service (RELIABILITY 7.3).
    assert requests.get(f"{server.url}/ping", timeout=1).status_code == 200
    assert requests.get(f"{server.url}/health/ready").status_code == 503
    assert notify.pings(since=stuck_at + 0.6) == []


def test_13_5_a_blocked_event_loop_sends_no_ping(tmp_path, serve, notify):
    # A hook that holds the GIL for 3 s (a C call made through PyDLL keeps it), as a runaway C extension would:
    # the event loop cannot run, so neither /ping nor the watchdog answers.
    hook = "import ctypes\ndef main(context):\n    ctypes.PyDLL(None).sleep(3)\n"
    server = watched(tmp_path, serve, notify, hook, node={"timeout_s": 10})
    sender = threading.Thread(target=requests.post, args=(f"{server.url}/analyze_image",), kwargs={"data": BODY})
    blocked_from = time.monotonic()
    sender.start()
    sender.join()
    notify.wait_for(lambda: len(notify.pings(since=blocked_from + 3)) >= 2, timeout=5)
    assert notify.pings(since=blocked_from + 0.6, until=blocked_from + 2.9) == []


def test_12_2_two_thousand_requests_at_a_steady_rate_while_versions_are_swapped_5_times(two_versions):
    _, server = two_versions
    headers = {"X-API-Key": "k"}
    body = frame((0, 0, 255))
    rate, total, clients = 100.0, 2000, 4  # 20 s of frames; the first 6 s before any swap
    first_swap_at, swap_every = 6.0, 2.4
    answers: list[tuple[float, float, int, str | None, float | None]] = []
    begin = time.monotonic() + 0.5

    def camera(index: int) -> None:
        with requests.Session() as session:
            for number in range(index, total, clients):
                time.sleep(max(0.0, begin + number / rate - time.monotonic()))
                sent = time.monotonic()
                response = session.post(f"{server.url}/analyze_image", data=body, headers=headers)
                took = time.monotonic() - sent
                ctx = response.json() if response.status_code == 200 else {}
                version = ctx.get("models", [{}])[0].get("version")
                answers.append((sent, took, response.status_code, version, ctx.get("threshold")))

    swaps: list[tuple[float, float, int]] = []
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        cameras = [pool.submit(camera, index) for index in range(clients)]
        for number in range(5):
            time.sleep(max(0.0, begin + first_swap_at + number * swap_every - time.monotonic()))
            started = time.monotonic()
            switched = requests.post(f"{server.url}/models/switch?model=red&version={'21'[number % 2]}",
                                     headers=headers)
            swaps.append((started, time.monotonic(), switched.status_code))
        for future in cameras:
            future.result()
    assert [code for _, _, code in swaps] == [200] * 5
    assert len(answers) == total
    assert [a for a in answers if a[2] != 200] == []
    # Each answer comes whole from one version: version 1 has threshold 0.5, version 2 has 2.0.
    assert {(version, threshold) for *_, version, threshold in answers} == {("1", 0.5), ("2", 2.0)}
    before = [took for sent, took, *_ in answers if sent < swaps[0][0]]
    during = [took for sent, took, *_ in answers if swaps[0][0] <= sent <= swaps[-1][1]]
    p99_before = statistics.quantiles(before, n=100)[98]
    p99_during = statistics.quantiles(during, n=100)[98]
    assert len(before) >= 500 and len(during) >= 900
    assert p99_during <= 2 * p99_before, f"p99 {p99_before * 1000:.1f} ms before, {p99_during * 1000:.1f} ms during"


def test_12_3_a_failed_switch_leaves_the_old_version_ready_and_health_names_it(two_versions):
    _, server = two_versions
    headers = {"X-API-Key": "k"}
    failed = requests.post(f"{server.url}/models/switch?model=red&version=9", headers=headers)
    assert failed.status_code == 400
    assert requests.get(f"{server.url}/health/ready").status_code == 200
    health = requests.get(f"{server.url}/health").json()
    assert health["models"]["red"]["pending_version_failed"] == "9"
    assert health["models"]["red"]["version"] in ("1", "2")
    ctx = requests.post(f"{server.url}/analyze_image", data=frame((0, 0, 255)), headers=headers).json()
    assert ctx["models"][0]["version"] == health["models"]["red"]["version"]
    assert "not loaded, the old one keeps serving" in server.log_text()


def error_lines(server) -> list[dict]:
    return [entry for entry in map(json.loads, server.log_text().splitlines()) if entry["level"] == "ERROR"]


@pytest.mark.parametrize("how", ["switch", "pointer"])
def test_12_3_and_12_5_a_version_that_fails_to_load_leaves_the_old_one_serving(two_versions, how):
    project, server = two_versions
    headers = {"X-API-Key": "k"}
    failures = 'appliance_model_load_failures_total{model="red"}'
    before = metric(requests.get(f"{server.url}/metrics").text, failures)
    if how == "switch":
        # Version 3 is complete on disk but its weights do not match the manifest. It is made aside, so that the
        # server's pointer check never sees `current` naming it.
        save_red_detector(project.parent / "staging", "3")
        with open(project.parent / "staging" / "red" / "3" / "model.bin", "ab") as weights:
            weights.write(b"\0")
        os.replace(project.parent / "staging" / "red" / "3", project / "models" / "red" / "3")
        answer = requests.post(f"{server.url}/models/switch?model=red&version=3", headers=headers)
        assert answer.status_code == 400 and "sha256 mismatch" in answer.json()["message"]
        failed, reason = "3", "sha256 mismatch"
    else:
        # `current` moved to a version that is not there (12.5); the server notices it within 2 s.
        switch_current(project / "models" / "red", "7")
        failed, reason = "7", "version 7"
        deadline = time.monotonic() + 8
        while not error_lines(server) and time.monotonic() < deadline:
            time.sleep(0.2)
    (error,) = error_lines(server)
    assert "the old one keeps serving" in error["msg"] and reason in error["msg"]
    assert metric(requests.get(f"{server.url}/metrics").text, failures) == before + 1
    assert requests.get(f"{server.url}/health/ready").status_code == 200
    health = requests.get(f"{server.url}/health").json()
    assert health["status"] == "ready"
    assert health["models"]["red"] == {"version": "1", "device": "CPU", "pending_version_failed": failed}
    ctx = requests.post(f"{server.url}/analyze_image", data=frame((0, 0, 255)), headers=headers).json()
    assert ctx["models"][0]["version"] == "1" and ctx["result"] is False
    if how == "pointer":
        time.sleep(2.5)  # a failed pointer is not retried every 2 s, and not logged again
        assert len(error_lines(server)) == 1


def save_heavy_detector(store: Path, version: str, threshold: float, weights_mib: int = 32) -> None:
    """The red detector plus a dense layer of `weights_mib` MiB whose output is multiplied by 0: the same
    answers, but each compiled version holds that much memory, so a version kept alive after its swap shows."""
    image = ops.parameter([1, 3, 64, 64], ov.Type.f32, name="input")
    red = ops.slice(image, ops.constant(np.array([0])), ops.constant(np.array([1])), ops.constant(np.array([1])),
                    ops.constant(np.array([1])))
    columns = weights_mib * (1 << 20) // (4 * 3 * 64 * 64)
    weights = np.random.default_rng(int(version)).standard_normal((3 * 64 * 64, columns), dtype=np.float32)
    flat = ops.reshape(image, ops.constant(np.array([1, -1])), special_zero=False)
    dense = ops.reduce_sum(ops.matmul(flat, ops.constant(weights), False, False), ops.constant(np.array([0, 1])),
                           keep_dims=False)
    anomaly_map = ops.add(red, ops.multiply(dense, ops.constant(np.float32(0.0))), name="anomaly_map")
    anomaly_map.output(0).set_names({"anomaly_map"})
    score = ops.reshape(ops.reduce_max(anomaly_map, ops.constant(np.array([1, 2, 3])), keep_dims=False),
                        ops.constant(np.array([1])), special_zero=False, name="pred_score")
    score.output(0).set_names({"pred_score"})
    version_dir = store / "red" / version
    version_dir.mkdir(parents=True)
    ov.save_model(ov.Model([score, anomaly_map], [image], "heavy_red_detector"), version_dir / "model.xml",
                  compress_to_fp16=False)
    spec = {"task": "anomaly", "input": {"name": "input", "size": [64, 64], "element_type": "f32", "layout": "NCHW",
                                         "colour_order": "RGB", "scale": 1 / 255},
            "outputs": {"score": "pred_score", "map": "anomaly_map"}, "threshold": threshold,
            "pixel_threshold": threshold}
    (version_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    write_manifest(version_dir)
    switch_current(store / "red", version)


def test_12_4_memory_returns_to_the_single_version_level_after_5_swaps(tmp_path, serve):
    from tests.server.test_leaks import process_counts

    project = write_project(tmp_path / "p", FLOW, api_key="k")
    save_heavy_detector(project / "models", "2", threshold=2.0)
    save_heavy_detector(project / "models", "1", threshold=0.5)
    server = serve(project)
    headers = {"X-API-Key": "k"}
    body = frame((0, 0, 255))

    def frames(version: str) -> None:
        with requests.Session() as session:
            for _ in range(20):
                assert session.post(f"{server.url}/analyze_image", data=body,
                                    headers=headers).json()["models"][0]["version"] == version

    def swap(version: str) -> None:
        assert requests.post(f"{server.url}/models/switch?model=red&version={version}", headers=headers).ok
        frames(version)

    frames("1")
    for version in "21":  # warm-up: allocator arenas and OpenVINO's per-compile caches
        swap(version)
    rss_single = process_counts(server.process.pid)[2]
    for version in "21212":
        swap(version)
    rss_after = process_counts(server.process.pid)[2]
    assert rss_after <= rss_single * 1.10, f"RSS {rss_single // 1024} MiB before, {rss_after // 1024} MiB after"


def test_12_1_a_confirmed_switch_stays_switched_through_30_switches_with_frames_flowing_and_a_fast_follower(
        tmp_path, serve):
    # The pointer follower polls every 10 ms instead of 2 s, so that it reads the pointers again and again while
    # each switch compiles and swaps: a follower that could read the old pointer after the swap would switch
    # back to the old version, and the frames after the 200 would answer it.
    project = write_project(tmp_path / "p", FLOW, api_key="k")
    save_red_detector(project / "models", "2", threshold=2.0)
    save_red_detector(project / "models", "1", threshold=0.5)
    server = serve(project, env={"APPLIANCE_POINTER_POLL_S": "0.01"})
    headers = {"X-API-Key": "k"}
    body = frame((0, 0, 255))
    answers: list[tuple[float, float, int, str | None]] = []  # (sent, answered, status, version)
    stop = threading.Event()

    def camera() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                sent = time.monotonic()
                response = session.post(f"{server.url}/analyze_image", data=body, headers=headers)
                version = response.json()["models"][0]["version"] if response.status_code == 200 else None
                answers.append((sent, time.monotonic(), response.status_code, version))

    switches: list[tuple[float, float, str]] = []  # (asked, confirmed, version)
    cameras = [threading.Thread(target=camera) for _ in range(3)]
    for thread in cameras:
        thread.start()
    try:
        with requests.Session() as session:
            for number in range(30):
                version = "21"[number % 2]
                asked = time.monotonic()
                switched = session.post(f"{server.url}/models/switch?model=red&version={version}", headers=headers)
                confirmed = time.monotonic()
                assert switched.status_code == 200, switched.text
                switches.append((asked, confirmed, version))
                # Right after the 200, and again after several of the follower's polls: the confirmed version.
                for pause in (0, 0, 0.03, 0.05):
                    time.sleep(pause)
                    ctx = session.post(f"{server.url}/analyze_image", data=body, headers=headers).json()
                    assert ctx["models"][0]["version"] == version, f"switch {number + 1} to {version} undone"
                assert (project / "models" / "red" / "current").read_text() == version
    finally:
        stop.set()
        for thread in cameras:
            thread.join()
    assert [a for a in answers if a[2] != 200] == []
    # Every camera frame sent after a 200 and answered before the next switch was asked answers the confirmed
    # version (one answered later may rightly answer the next switch's).
    checked = 0
    for (_, confirmed, version), following in zip(switches, [*switches[1:], (math.inf, math.inf, "")],
                                                  strict=True):
        between = [a for a in answers if confirmed <= a[0] and a[1] < following[0]]
        late = [a for a in between if a[3] != version]
        assert late == [], f"frames after the switch to {version} answered {sorted({a[3] for a in late})}"
        checked += len(between)
    assert checked >= 100
    health = requests.get(f"{server.url}/health").json()
    assert health["models"]["red"] == {"version": "1", "device": "CPU"}
    # The follower saw nothing to do: every swap in the log is one that a switch asked for.
    swaps = [entry["msg"] for entry in map(json.loads, server.log_text().splitlines())
             if entry["msg"].startswith("model red: ") and " -> " in entry["msg"]]
    assert len(swaps) == 30, swaps
