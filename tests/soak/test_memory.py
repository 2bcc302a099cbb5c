"""RELIABILITY 13.1, run by `make soak` (not by `make test`): RSS stays flat over thousands of mixed requests."""

from __future__ import annotations

import os
import time

import pytest
import requests

from tests.conftest import write_project
from tests.nodes.test_anomaly import FLOW, frame, save_red_detector
from tests.server.test_leaks import mixed_traffic, process_counts

pytestmark = pytest.mark.soak

# Counts of mixed requests (RELIABILITY 13.1): 500 to warm up, then the growth from 1,000 to 5,000 must stay
# under 20 MiB. SOAK_REQUESTS raises the end for a nightly run (50,000).
WARM_UP, FIRST, LAST = 500, 1000, int(os.environ.get("SOAK_REQUESTS", "5000"))


def test_13_1_rss_is_flat_over_mixed_traffic_on_a_model_flow(tmp_path, serve, capsys):
    project = write_project(tmp_path / "p", FLOW)
    save_red_detector(project / "models")
    server = serve(project)
    red = frame((0, 0, 255))

    def traffic(count: int) -> None:
        # Rounds of 10: mixed_traffic's 8 kinds (annotated image, truncated and text bodies, shared memory, bad
        # parameters, unknown paths, a cut upload, a heat map), then an NG frame of the model, as context and image.
        with requests.Session() as session:
            for _ in range(0, count, 10):
                mixed_traffic(server.url, server.port, 8)
                session.post(f"{server.url}/analyze_image", data=red)
                session.post(f"{server.url}/analyze_image?response_type=annotated_image", data=red)

    started = time.monotonic()
    traffic(WARM_UP)
    traffic(FIRST - WARM_UP)
    rss_first = process_counts(server.process.pid)[2]
    traffic(LAST - FIRST)
    rss_last = process_counts(server.process.pid)[2]
    seconds = time.monotonic() - started
    with capsys.disabled():
        print(f"\nsoak: RSS {rss_first / 1024:.1f} MiB at request {FIRST}, {rss_last / 1024:.1f} MiB at {LAST} "
              f"({(rss_last - rss_first) / 1024:+.1f} MiB); {LAST} requests in {seconds:.0f} s "
              f"({LAST / seconds:.0f}/s)")
    assert rss_last - rss_first < 20 * 1024, (rss_first, rss_last)
    assert requests.get(f"{server.url}/ping").text == "pong"
