"""The console never slows the line: shared-memory throughput with a page on the console's live view, against the
same server with no page open.

One server of hot_path.py's project (crop + evaluate on 1920x1080 frames handed over in shared memory) with
`console: {enabled: true}`. Rows, each a closed loop of ``--clients`` clients for ``--seconds``, measured on that
same process, ``--rounds`` times in rotating order with a pause before each (the median is kept):

* no page open: the console is on, but the worker's hook returns at once (what "console off" costs; the hook's
  own cost per frame is measured in-process below);
* a page on the live view: a server-sent events client reading every frame (5 a second, each drawn and
  JPEG-encoded by the console's thread), as a browser on the engineer's laptop would;
* with ``--browser``, a real headless Chromium on the live view on this same machine instead.

A second server runs the same flow with every frame NG (its rule fails), so that each frame also goes to the
gallery (PNG, at most 5 a second): no page, then the live view. The ratio is each row over its server's "no page
open" row (goal >= 0.95 for the live view); the server's CPU time per request (user + system from /proc, its
threads included) is shown beside it.

Why one process and not "console off" in another: on these shared cores two identical processes of the same
project measured 120 and 211 requests/s (5.9 and 3.3 ms of CPU per request) side by side, run after run, so a
comparison across processes measures the processes, not the console.

    .venv/bin/python bench/console.py [--seconds 2] [--clients 2] [--rounds 10] [--browser]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.hot_path import HEIGHT, WIDTH, over_http, test_frame  # noqa: E402
from tests.conftest import Server, start_server  # noqa: E402

FLOW = {"nodes": {
    "roi": {"type": "crop@1", "x": 320, "y": 140, "width": 1280, "height": 800, "next": ["verdict"]},
    "verdict": {"type": "evaluate@1", "rules": [{"rule": "max_rectangles", "count": 0}]},
}}
# The same flow, NG for every frame: at least one rectangle is required and none is found.
NG_FLOW = {"nodes": {
    "roi": {"type": "crop@1", "x": 320, "y": 140, "width": 1280, "height": 800, "next": ["verdict"]},
    "verdict": {"type": "evaluate@1", "rules": [{"rule": "min_rectangles", "count": 1}]},
}}
SETTLE_S = 1.0
NO_PAGE, LIVE, BROWSER = "no page open", "live view streaming", "Chromium on the live view (same machine)"
ALL_NG = "every frame NG (gallery writing)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def project(folder: Path, flow: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "flow.yaml").write_text(yaml.safe_dump(flow))
    config: dict[str, Any] = {"name": folder.name, "flow": "flow.yaml", "limits": {"queue_depth": 16},
                              "console": {"enabled": True}}
    (folder / "project.yaml").write_text(yaml.safe_dump(config))
    return folder


class LiveReader:
    """A page on the live view: a console session, then the event stream read in a thread of its own."""

    def __init__(self, server: Server):
        self.server = server
        self.frames = 0
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read()), daemon=True)

    async def _read(self) -> None:
        # unsafe: keep the session cookie of a host given as an IP address (aiohttp drops those by default).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            (await session.get(f"{self.server.url}/console/api/session")).raise_for_status()
            async with session.get(f"{self.server.url}/console/api/live",
                                   timeout=aiohttp.ClientTimeout(total=None)) as stream:
                stream.raise_for_status()
                self._opened.set()
                async for line in stream.content:
                    if line.startswith(b"event: frame"):
                        self.frames += 1
                    if self._stop.is_set():
                        return

    def __enter__(self) -> LiveReader:
        self._thread.start()
        self._opened.wait(30)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


@contextmanager
def chromium_page(server: Server):
    """A real headless Chromium on the live view, in a thread of its own (Playwright's sync API)."""
    import shutil

    from playwright.sync_api import sync_playwright

    ready, stop = threading.Event(), threading.Event()

    def run() -> None:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"{server.url}/console/#live")
            page.wait_for_selector("#tabs:not([hidden])")
            ready.set()
            stop.wait()
            browser.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(60)
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


def hook_cost_ns() -> float:
    """What the console's three observers cost a worker per OK frame while no page watches (in-process)."""
    from appliance.config.project import ConsoleSettings
    from appliance.console.background import Background
    from appliance.console.gallery import Gallery
    from appliance.console.live import LiveView
    from appliance.console.teach import Teaching
    from appliance.context import Context

    settings = ConsoleSettings(enabled=True)
    with tempfile.TemporaryDirectory() as tmp:
        background = Background("bench")
        observers = [LiveView(settings.live_fps).observe, Gallery(Path(tmp), settings.gallery, background).observe,
                     Teaching(Path(tmp) / "teach", background).observe]
        image = np.zeros((8, 8, 3), np.uint8)
        ctx = Context.for_frame(image, "")
        ctx["result"] = True
        rounds = 200_000
        started = time.perf_counter_ns()
        for _ in range(rounds):
            for observer in observers:
                observer(image, ctx, None)
        return (time.perf_counter_ns() - started) / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--browser", action="store_true", help="also a row with a real Chromium on the live view")
    args = parser.parse_args()
    frame = test_frame()
    blocks: list[shared_memory.SharedMemory] = []
    rows: dict[tuple[str, str], list[float]] = {}
    cpu_per_request: dict[tuple[str, str], list[float]] = {}
    pushed: dict[tuple[str, str], list[int]] = {}

    def shm_request(index: int) -> dict:
        while len(blocks) <= index:
            block = shared_memory.SharedMemory(create=True, size=frame.nbytes)
            np.ndarray(frame.shape, np.uint8, buffer=block.buf)[:] = frame
            blocks.append(block)
        return {"query": f"?width={WIDTH}&height={HEIGHT}&name={blocks[index].name}"}

    def measure(server: Server, key: tuple[str, str]) -> None:
        """One closed loop: requests/s, and the server's CPU seconds per request."""
        cpu_before = cpu_seconds(server.process.pid)
        result = asyncio.run(over_http(f"{server.url}/analyze_image_shared_memory", shm_request, args.clients,
                                       args.seconds))
        cpu = cpu_seconds(server.process.pid) - cpu_before
        rows.setdefault(key, []).append(result["rps"])
        cpu_per_request.setdefault(key, []).append(cpu / (result["rps"] * args.seconds) * 1000)

    def with_live_page(server: Server, key: tuple[str, str]) -> None:
        with LiveReader(server) as reader:
            measure(server, key)
        pushed.setdefault(key, []).append(reader.frames)

    def with_browser(server: Server, key: tuple[str, str]) -> None:
        with chromium_page(server):
            measure(server, key)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        servers = {name: start_server(project(root / folder, flow), log_file=root / f"{folder}.log", log_level="INFO")
                   for name, folder, flow in (("OK frames", "ok", FLOW), (ALL_NG, "ng", NG_FLOW))}
        plan: list[tuple[Callable[[Server, tuple[str, str]], None], str, str]] = []
        for name in servers:
            plan += [(measure, name, NO_PAGE), (with_live_page, name, LIVE)]
        if args.browser:
            plan.append((with_browser, "OK frames", BROWSER))
        try:
            for round_number in range(args.rounds):
                # Each round starts at another row, each row after a pause: what a row leaves behind (the gallery's
                # queued writes, a browser closing) must not land on the same row every round.
                shift = round_number % len(plan)
                for run, name, row in plan[shift:] + plan[:shift]:
                    time.sleep(SETTLE_S)
                    run(servers[name], (name, row))
            ng = servers[ALL_NG]
            with requests.Session() as session:
                session.get(f"{ng.url}/console/api/session", timeout=30)
                gallery = session.get(f"{ng.url}/console/api/gallery", timeout=30).json()
        finally:
            for server in servers.values():
                server.stop()
            for block in blocks:
                block.close()
                block.unlink()

    print(f"\nShared-memory path, 1920x1080 frames, crop + evaluate, console on, {args.clients} clients, "
          f"{args.seconds:g} s per row, median of {args.rounds} rounds (rows in rotating order), client and server "
          f"on the same {os.cpu_count()} cores\n")
    print("| frames | page | req/s (median) | runs | throughput ratio | server CPU ms / request | CPU ratio | "
          "frames pushed to the page |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, row), values in rows.items():
        base = statistics.median(rows[(name, NO_PAGE)])
        base_cpu = statistics.median(cpu_per_request[(name, NO_PAGE)])
        cpu = statistics.median(cpu_per_request[(name, row)])
        runs = ", ".join(f"{value:.0f}" for value in values)
        frames = ", ".join(map(str, pushed.get((name, row), []))) or "–"
        print(f"| {name} | {row} | {statistics.median(values):.1f} | {runs} | {statistics.median(values) / base:.2f} "
              f"| {cpu:.2f} | {base_cpu / cpu:.2f} | {frames} |")
    print(f"\nThe worker's hook with no page open, per OK frame (in-process): {hook_cost_ns():.0f} ns.")
    print(f"Gallery of the all-NG server afterwards: {gallery['total']} frames kept (bound {gallery['max_frames']}), "
          f"{gallery['dropped']} not kept (over {gallery['max_per_second']} a second, or the disk busy).")


if __name__ == "__main__":
    main()
