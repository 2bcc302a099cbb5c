"""Nothing leaks after mixed good and bad traffic: descriptors, threads and memory (RELIABILITY 13.2-13.4)."""

from __future__ import annotations

import os
import socket
from multiprocessing import shared_memory

import numpy as np
import requests

from tests.server.test_protocol import jpeg, part_image, png


def process_counts(pid: int) -> tuple[int, int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return fds, threads, rss


def mixed_traffic(url: str, port: int, rounds: int) -> None:
    image = part_image(True)
    bodies = {"png": png(image), "jpeg": jpeg(image), "truncated": jpeg(image)[:5000], "text": b"hello"}
    block = shared_memory.SharedMemory(create=True, size=image.nbytes)
    np.ndarray(image.shape, np.uint8, buffer=block.buf)[:] = image
    try:
        with requests.Session() as session:
            for index in range(rounds):
                kind = index % 8
                if kind == 0:
                    session.post(f"{url}/analyze_image?response_type=annotated_image", data=bodies["png"])
                elif kind == 1:
                    session.post(f"{url}/analyze_image", data=bodies["truncated"])
                elif kind == 2:
                    session.post(f"{url}/analyze_image", data=bodies["text"])
                elif kind == 3:
                    session.post(f"{url}/analyze_image_shared_memory?width=1920&height=1080&name={block.name}")
                elif kind == 4:
                    session.post(f"{url}/analyze_raw_image?width=0&height=5", data=b"x")
                elif kind == 5:
                    session.post(f"{url}/nope/{index}")
                elif kind == 6:
                    with socket.create_connection(("127.0.0.1", port)) as sock:  # an upload cut short
                        sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n"
                                     + bodies["jpeg"][:3000])
                else:
                    session.post(f"{url}/analyze_image?response_type=heatmap&context_in_body", data=bodies["jpeg"])
    finally:
        block.close()
        block.unlink()


def test_descriptors_threads_and_memory_are_stable_after_mixed_traffic(spots_server):
    mixed_traffic(spots_server.url, spots_server.port, 160)  # warm-up: pools, caches, allocator arenas
    fds_before, threads_before, rss_before = process_counts(spots_server.process.pid)
    mixed_traffic(spots_server.url, spots_server.port, 640)
    assert requests.get(f"{spots_server.url}/ping").text == "pong"
    fds_after, threads_after, rss_after = process_counts(spots_server.process.pid)
    assert abs(fds_after - fds_before) <= 2, (fds_before, fds_after)
    assert threads_after == threads_before
    assert rss_after - rss_before < 30 * 1024, f"RSS grew {(rss_after - rss_before) / 1024:.1f} MiB"
    metrics = requests.get(f"{spots_server.url}/metrics").text
    assert "appliance_in_flight_requests 0.0" in metrics
    assert "appliance_queue_depth 0.0" in metrics
    # Route names only: 80 different unknown paths add no series.
    assert "/nope" not in metrics
