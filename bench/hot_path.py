"""`make bench`: the hot path (receive, decode/demosaic, flow, encode) over HTTP against the in-process ceiling.

One run measures the same flow (crop + evaluate, after demosaicing for Bayer input) fed 1920x1080 frames:
in-process (no HTTP), and over HTTP with a raw BGR body, a Bayer RG8 body, a JPEG body and shared memory, at 1
and 8 concurrent clients. It prints requests/s, p50/p99 latency, each path's ratio to its in-process twin, and the
server process's CPU per request (user + system, from /proc: steadier than latency when other work shares the
cores). Client and server share this machine's cores, as a camera script beside the appliance would; the load
average before the run is printed with the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance import frames  # noqa: E402
from appliance.context import to_json  # noqa: E402
from appliance.project import Project  # noqa: E402
from appliance.server import render as answer  # noqa: E402
from tests.conftest import start_server  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
FLOW = {"nodes": {
    "roi": {"type": "crop@1", "x": 320, "y": 140, "width": 1280, "height": 800, "next": ["verdict"]},
    "verdict": {"type": "evaluate@1", "rules": [{"rule": "max_rectangles", "count": 0}]},
}}


def test_frame() -> np.ndarray:
    from skimage import data

    astronaut = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    chelsea = cv2.cvtColor(data.chelsea(), cv2.COLOR_RGB2BGR)
    side = np.hstack([astronaut, cv2.resize(chelsea, (512, 512))])
    return cv2.resize(side, (WIDTH, HEIGHT))


def cpu_seconds(pid: int) -> float:
    """User + system time of a process so far (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"rps": len(ordered) / elapsed, "p50": statistics.median(ordered) * 1000,
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, "n": len(ordered)}


def in_process(project: Project, decode, clients: int, seconds: float) -> dict[str, float]:
    def one() -> float:
        started = time.perf_counter()
        ctx = project.inspect(decode(), "")
        to_json(ctx)
        return time.perf_counter() - started

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        while time.perf_counter() < deadline:
            latencies += list(pool.map(lambda _: one(), range(clients)))
    return summary(latencies, time.perf_counter() - started)


async def over_http(url: str, make_request, clients: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client(index: int) -> None:
            request = make_request(index)
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url + request["query"], data=request.get("body")) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{response.status}: {await response.text()}")
                latencies.append(time.perf_counter() - started)

        # One warm-up request per client, not measured.
        deadline = time.perf_counter() + 0.001
        await asyncio.gather(*(client(i) for i in range(clients)))
        latencies.clear()
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(i) for i in range(clients)))
        return summary(latencies, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per row")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    cv2.setNumThreads(2)
    frame = test_frame()
    mosaic = frames.mosaic_rggb(frame)
    jpeg_bytes = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    bgr_bytes, bayer_bytes = frame.tobytes(), mosaic.tobytes()

    with tempfile.TemporaryDirectory() as tmp:
        project_dir = Path(tmp) / "bench"
        project_dir.mkdir()
        (project_dir / "flow.yaml").write_text(yaml.safe_dump(FLOW))
        # Deep enough for 8 clients: the bench measures throughput, not the 503s of a full queue.
        (project_dir / "project.yaml").write_text(yaml.safe_dump({"name": "bench", "flow": "flow.yaml",
                                                                  "limits": {"queue_depth": 16}}))
        project = Project.load(project_dir)
        project.prepare()
        decoders = {
            "bgr": lambda: frames.raw_frame(bgr_bytes, WIDTH, HEIGHT, bayer=False),
            "bayer": lambda: frames.raw_frame(bayer_bytes, WIDTH, HEIGHT, bayer=True),
            "jpeg": lambda: frames.decode_image(jpeg_bytes, max_frame_pixels=1 << 25),
        }
        blocks: list[shared_memory.SharedMemory] = []

        def shm_request(index: int) -> dict:
            while len(blocks) <= index:
                block = shared_memory.SharedMemory(create=True, size=frame.nbytes)
                np.ndarray(frame.shape, np.uint8, buffer=block.buf)[:] = frame
                blocks.append(block)
            return {"query": f"?width={WIDTH}&height={HEIGHT}&name={blocks[index].name}"}

        paths = [
            ("shared memory, image answer (PNG)", "bgr", "/analyze_image_shared_memory", lambda i: {
                "query": shm_request(i)["query"] + "&response_type=image&context_in_body"}),
            ("shared memory, image answer (JPEG)", "bgr", "/analyze_image_shared_memory", lambda i: {
                "query": shm_request(i)["query"] + "&response_type=image&image_format=jpeg&context_in_body"}),
            ("raw BGR body", "bgr", "/analyze_raw_image", lambda i: {"query": f"?width={WIDTH}&height={HEIGHT}",
                                                                     "body": bgr_bytes}),
            ("Bayer RG8 body", "bayer", "/analyze_raw_image",
             lambda i: {"query": f"?width={WIDTH}&height={HEIGHT}&bayer", "body": bayer_bytes}),
            ("JPEG body", "jpeg", "/analyze_image", lambda i: {"query": "", "body": jpeg_bytes}),
            ("shared memory", "bgr", "/analyze_image_shared_memory", shm_request),
        ]
        server = start_server(project_dir, log_file=Path(tmp) / "server.log", log_level="INFO")
        rows = []
        try:
            for clients in (1, 8):
                ceilings = {kind: in_process(project, decode, clients, args.seconds)
                            for kind, decode in decoders.items()}
                for kind, ceiling in ceilings.items():
                    rows.append((f"in-process ({kind})", clients, ceiling, ceiling))
                for name, kind, endpoint, make_request in paths:
                    cpu_before = cpu_seconds(server.process.pid)
                    result = asyncio.run(over_http(server.url + endpoint, make_request, clients, args.seconds))
                    # The warm-up requests are in the CPU too: a handful against thousands.
                    result["server_cpu_ms"] = (cpu_seconds(server.process.pid) - cpu_before) / result["n"] * 1000
                    rows.append((name, clients, result, ceilings[kind]))
        finally:
            server.stop()
            for block in blocks:
                block.close()
                block.unlink()
            project.close()

    print("\nEncoding a 1920x1080 answer image in-process (median of 15):\n")
    print("| encoder | ms | bytes |")
    print("|---|---|---|")
    for name, ext, params in (("PNG, OpenCV default", ".png", []), ("PNG, as served (level 0, no filter)", ".png",
                                                                      answer._PNG_FAST),
                              ("JPEG quality 90", ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])):
        times, size = [], 0
        for _ in range(15):
            started = time.perf_counter()
            size = len(cv2.imencode(ext, frame, params)[1])
            times.append(time.perf_counter() - started)
        print(f"| {name} | {statistics.median(times) * 1000:.1f} | {size} |")
    print(f"\nHot path, 1920x1080 frames, flow crop + evaluate, {args.seconds:g} s per row, "
          f"client and server on the same {os.cpu_count()} cores; load average {load_before:.1f} before the run, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print("| path | clients | req/s | p50 ms | p99 ms | in-process p50 ms | overhead p50 ms | throughput ratio | "
          "server CPU ms per request |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, clients, result, ceiling in rows:
        cpu = f"{result['server_cpu_ms']:.2f}" if "server_cpu_ms" in result else "-"
        print(f"| {name} | {clients} | {result['rps']:.1f} | {result['p50']:.2f} | {result['p99']:.2f} | "
              f"{ceiling['p50']:.2f} | {result['p50'] - ceiling['p50']:+.2f} | {result['rps'] / ceiling['rps']:.2f} | "
              f"{cpu} |")


if __name__ == "__main__":
    main()
