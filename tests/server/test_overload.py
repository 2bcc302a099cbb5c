"""Under overload the health endpoints stay fast (RELIABILITY 8.3, 8.5): bounded in clients, counts and seconds."""

from __future__ import annotations

import multiprocessing
import threading
import time

import requests

from tests.conftest import slow_project
from tests.server.test_protocol import part_image, png


def cameras(url: str, body: bytes, clients: int, seconds: float, results) -> None:
    """`clients` threads posting frames in a loop; in its own process so its GIL does not slow the probe."""
    stop = time.monotonic() + seconds

    def camera() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                results.append(session.post(f"{url}/analyze_image", data=body, timeout=10).status_code)
                time.sleep(0.02)

    threads = [threading.Thread(target=camera) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_ping_and_metrics_stay_fast_while_every_worker_is_busy_and_the_queue_is_full(tmp_path, serve):
    project = slow_project(tmp_path / "p", 0.5, limits={"queue_depth": 4})
    server = serve(project)
    body = png(part_image(False, 32, 32))
    manager = multiprocessing.Manager()
    statuses = manager.list()
    load = multiprocessing.Process(target=cameras, args=(server.url, body, 50, 8.0, statuses))
    load.start()
    try:
        time.sleep(1.0)
        with requests.Session() as session:
            pings = []
            for _ in range(1000):
                started = time.perf_counter()
                assert session.get(f"{server.url}/ping", timeout=5).status_code == 200
                pings.append(time.perf_counter() - started)
            scrapes = []
            for _ in range(100):
                started = time.perf_counter()
                assert session.get(f"{server.url}/metrics", timeout=5).status_code == 200
                scrapes.append(time.perf_counter() - started)
    finally:
        load.join(30)
    statuses = list(statuses)
    manager.shutdown()
    pings.sort()
    scrapes.sort()
    assert 503 in statuses and 200 in statuses
    assert pings[989] < 0.05, f"ping p99 {pings[989] * 1000:.1f} ms"
    assert scrapes[98] < 0.1, f"metrics p99 {scrapes[98] * 1000:.1f} ms"
    time.sleep(1.2)  # the last queued frames finish
    metrics = requests.get(f"{server.url}/metrics").text
    assert "appliance_in_flight_requests 0.0" in metrics and "appliance_queue_depth 0.0" in metrics
