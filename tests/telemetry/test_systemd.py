"""The notify protocol with a real datagram socket standing in for systemd (RELIABILITY 13.6)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.conftest import write_project


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_watchdog_and_stopping_arrive_in_order(tmp_path, serve, abstract):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"appliance-test-{os.getpid()}-{time.monotonic_ns()}"
        listener.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        listener.bind(address)
    listener.settimeout(10)
    project = write_project(tmp_path / "p", {"nodes": {"f": {"type": "flip@1", "direction": "both"}}})
    server = serve(project, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    received: list[tuple[float, str]] = []
    try:
        while sum(1 for _, m in received if m == "WATCHDOG=1") < 4:
            received.append((time.monotonic(), listener.recv(4096).decode()))
        server.process.send_signal(signal.SIGTERM)
        while not any(m.startswith("STOPPING=1") for _, m in received):
            received.append((time.monotonic(), listener.recv(4096).decode()))
    finally:
        listener.close()
    messages = [m for _, m in received if not m.startswith("EXTEND_TIMEOUT_USEC")]
    assert messages[0].startswith("READY=1\nSTATUS=serving test")
    assert messages[1:5] == ["WATCHDOG=1"] * 4
    assert messages[-1] == "STOPPING=1"
    # The first ping may have queued up while the test was still waiting for the start markers.
    pings = [t for t, m in received if m == "WATCHDOG=1"][1:]
    for earlier, later in zip(pings, pings[1:], strict=False):
        assert 0.4 <= later - earlier <= 0.6  # WATCHDOG_USEC / 2, within 20 %
    assert server.process.wait(10) == 0


def test_without_notify_socket_nothing_is_sent_and_nothing_fails():
    from appliance.telemetry.systemd import Notifier

    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_seconds is None
    notifier.send("READY=1")
    assert Notifier({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None  # not our pid
