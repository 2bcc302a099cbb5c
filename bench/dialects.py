"""`make bench`, API part: the same classify model through each API the appliance speaks, at 1 and 8 clients.

One server serves all four APIs on one port, every one answering from the same flow (classify@1 on
EfficientNet-lite0, the `objects` capability). Each row is a closed loop of clients sending a JPEG frame the way
that API's clients do (PEKAT: the body; RAYPACK and imagerecognize: a multipart form; Deepomatic: a multipart
submit, then polling the task until it succeeds, as one request). The ratio is to the model's in-process ceiling
(an AsyncInferQueue on the same compiled model, frames already resized) and to PEKAT's own row. Client and
server share the 2 cores, so a client that encodes a multipart form or makes two requests slows the server too:
the server's own CPU time per request (from /proc) is listed apart, as what each API costs the appliance.

    .venv/bin/python bench/dialects.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import cv2
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.project import Project  # noqa: E402
from bench.hot_path import summary  # noqa: E402
from bench.model_path import ceiling  # noqa: E402
from tests.conftest import start_server  # noqa: E402

KEY = "bench-key"
FLOW = REPO / "flows" / "vision" / "objects.yaml"
Call = Callable[[aiohttp.ClientSession, str, bytes], Awaitable[None]]


async def _ok(response: aiohttp.ClientResponse) -> dict:
    body = await response.read()
    if response.status != 200:
        raise RuntimeError(f"{response.url.path}: {response.status}: {body[:300]!r}")
    return await response.json(content_type=None) if body[:1] == b"{" else {}


async def pekat(session: aiohttp.ClientSession, url: str, jpeg: bytes) -> None:
    async with session.post(f"{url}/analyze_image", data=jpeg, headers={"X-API-Key": KEY}) as response:
        await _ok(response)


async def raypack(session: aiohttp.ClientSession, url: str, jpeg: bytes) -> None:
    form = aiohttp.FormData({"apikey": KEY, "model": "1", "threshold": "0.1", "lang": "en"})
    form.add_field("file", jpeg, filename="frame.jpg", content_type="image/jpeg")
    async with session.post(f"{url}/recog", data=form) as response:
        await _ok(response)


async def imagerecognize(session: aiohttp.ClientSession, url: str, jpeg: bytes) -> None:
    form = aiohttp.FormData({"apikey": KEY, "type": "objects", "max_labels": "5", "min_confidence": "10"})
    form.add_field("file", jpeg, filename="file")
    async with session.post(f"{url}/api/v2/", data=form) as response:
        await _ok(response)


async def deepomatic(session: aiohttp.ClientSession, url: str, jpeg: bytes) -> None:
    """Submit, then poll at once and again until done, as a client that wants the answer soonest would."""
    form = aiohttp.FormData()
    form.add_field("inputs[0]image.source", jpeg, filename="inputs[0]image.source")
    form.add_field("show_discarded", "False")
    form.add_field("max_predictions", "5")
    headers = {"X-API-KEY": KEY}
    async with session.post(f"{url}/v0.7/recognition/public/objects/inference", data=form,
                            headers=headers) as response:
        task_id = (await _ok(response))["task_id"]
    while True:
        async with session.get(f"{url}/v0.7/tasks/{task_id}/", headers=headers) as response:
            task = await _ok(response)
        if task["status"] == "success":
            return
        if task["status"] != "pending":
            raise RuntimeError(f"task {task_id}: {task}")
        await asyncio.sleep(0.002)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(call: Call, url: str, jpeg: bytes, clients: int, seconds: float,
                      server_pid: int) -> dict[str, float]:
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await call(session, url, jpeg)
                latencies.append(time.perf_counter() - started)

        deadline = time.perf_counter() + 0.001  # one warm-up call per client, not measured
        await asyncio.gather(*(client() for _ in range(clients)))
        latencies.clear()
        cpu_before = cpu_seconds(server_pid)
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client() for _ in range(clients)))
        result = summary(latencies, time.perf_counter() - started)
        result["server_cpu_ms"] = (cpu_seconds(server_pid) - cpu_before) * 1000 / max(1, len(latencies))
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    from skimage import data

    frame = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)
    jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    apis: list[tuple[str, Call]] = [("pekat", pekat), ("raypack", raypack), ("imagerecognize", imagerecognize),
                                    ("deepomatic (submit + poll)", deepomatic)]
    with tempfile.TemporaryDirectory() as tmp:
        project_dir = Path(tmp) / "apis"
        project_dir.mkdir()
        # The queue deep enough for 8 clients: this measures throughput, not 503s.
        (project_dir / "project.yaml").write_text(yaml.safe_dump({
            "name": "apis", "flow": str(FLOW), "models_dir": str(REPO / "models"), "api_key": KEY,
            "apis": ["pekat", "raypack", "imagerecognize", "deepomatic"], "capabilities": {"objects": str(FLOW)},
            "limits": {"queue_depth": 16}}))
        project = Project.load(project_dir)
        project.prepare()
        loaded = next(slot.current for slot in project.runtime.slots.values() if slot.current is not None)
        model_h, model_w = loaded.input_size
        top = ceiling(loaded, [cv2.resize(frame, (model_w, model_h), interpolation=cv2.INTER_AREA)[None]],
                      args.seconds)
        project.close()
        rows = []
        server = start_server(project_dir, log_file=Path(tmp) / "server.log", log_level="INFO")
        try:
            for clients in (1, 8):
                for name, call in apis:
                    rows.append((name, clients, asyncio.run(closed_loop(call, server.url, jpeg, clients,
                                                                        args.seconds, server.process.pid))))
        finally:
            server.stop()
    print(f"\nOne classify model ({loaded.name} v{loaded.version}, {model_w}x{model_h}, {loaded.device}, "
          f"{loaded.precision}) through each API; frame coffee {frame.shape[1]}x{frame.shape[0]} JPEG; "
          f"{args.seconds:g} s per row\n")
    print("| API | clients | req/s | p50 ms | p99 ms | ratio to ceiling | ratio to PEKAT (req/s) | p50 / PEKAT p50 "
          "| server CPU ms per request |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| in-process ceiling (AsyncInferQueue, {top['jobs']} jobs) | - | {top['rps']:.1f} | {top['p50']:.2f} | "
          f"{top['p99']:.2f} | 1.00 | - | - | - |")
    pekat_rows = {clients: result for name, clients, result in rows if name == "pekat"}
    for name, clients, result in rows:
        base = pekat_rows[clients]
        print(f"| {name} | {clients} | {result['rps']:.1f} | {result['p50']:.2f} | {result['p99']:.2f} | "
              f"{result['rps'] / top['rps']:.2f} | {result['rps'] / base['rps']:.2f} | "
              f"{result['p50'] / base['p50']:.2f} | {result['server_cpu_ms']:.1f} |")


if __name__ == "__main__":
    main()
