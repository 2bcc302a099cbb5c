"""faces@1 on BlazeFace: the model's in-process OpenVINO ceiling, the whole node in-process, and the HTTP path.

The ceiling is an AsyncInferQueue on the compiled model (as many jobs as the device's optimal number of
requests) fed frames already letterboxed to its input; the node in-process is `Project.inspect` (resize,
inference, decoding, NMS, pixelation) plus the JSON; the HTTP rows send JPEG frames to the project's server
and ask for the context, or the anonymised image (PNG as served, or JPEG).

Beside the rates, the CPU each request cost: the bench process's for the in-process rows, and for the HTTP rows
the server's and the client's apart (the client runs on the same cores). CPU per request moves less than the
rates when other work shares the machine; the load average is printed before and after.

    .venv/bin/python bench/faces_path.py [--project projects/faces-anonymise] [--size 1280x720] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import yaml
from skimage import data

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance import frames  # noqa: E402
from appliance.nodes.model import fit_image  # noqa: E402
from appliance.project import Project  # noqa: E402
from bench.hot_path import in_process, over_http  # noqa: E402
from bench.model_path import ceiling, node_times, print_node_times  # noqa: E402
from tests.conftest import start_server  # noqa: E402


def camera_frame(width: int, height: int) -> np.ndarray:
    """astronaut (one face) beside chelsea (a cat), scaled to the camera's size."""
    side_by_side = np.hstack([data.astronaut(), cv2.resize(data.chelsea(), (512, 512))])
    return cv2.resize(cv2.cvtColor(side_by_side, cv2.COLOR_RGB2BGR), (width, height), interpolation=cv2.INTER_AREA)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(run: Callable[[], dict[str, float]], server_pid: int | None = None) -> dict[str, float]:
    """``run()``'s result with the CPU milliseconds per request of this process (`client_cpu`) and, given its
    pid, of the server (`server_cpu`)."""
    own, server = time.process_time(), process_cpu_seconds(server_pid) if server_pid else 0.0
    result = run()
    result["client_cpu"] = (time.process_time() - own) / result["n"] * 1e3
    if server_pid:
        result["server_cpu"] = (process_cpu_seconds(server_pid) - server) / result["n"] * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(REPO / "projects" / "faces-anonymise"))
    parser.add_argument("--size", default="1280x720", help="camera frame WIDTHxHEIGHT")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.lower().split("x"))
    source_dir = Path(args.project).resolve()
    config = yaml.safe_load((source_dir / "project.yaml").read_text())
    load_before = os.getloadavg()
    frame = camera_frame(width, height)
    jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        project_dir = Path(tmp) / source_dir.name
        project_dir.mkdir()
        # The same flow and models; a queue deep enough for 8 clients: this measures throughput, not 503s.
        config.update(flow=str((source_dir / config["flow"]).resolve()),
                      models_dir=str((source_dir / config.get("models_dir", "models")).resolve()),
                      cache_dir=str(Path(tmp) / "cache"), limits={**config.get("limits", {}), "queue_depth": 16})
        (project_dir / "project.yaml").write_text(yaml.safe_dump(config))
        project = Project.load(project_dir)
        project.prepare()
        (slot,) = project.runtime.slots.values()
        loaded = slot.current
        assert loaded is not None
        rectangles = project.inspect(frames.Frame(frame, "bench"), "")["detectedRectangles"]
        top = ceiling(loaded, [fit_image(frame, loaded.input_size, "letterbox").batch], args.seconds)
        rows = [(f"in-process ceiling (AsyncInferQueue, {top['jobs']} jobs)", "-", top)]
        for clients in (1, 2):
            rows.append(("node in-process (Project.inspect + JSON)", clients, with_cpu(lambda c=clients: in_process(
                project, lambda: frames.decode_image(jpeg, max_frame_pixels=1 << 25), c, args.seconds))))
        # The whole-node ceiling: the better of the in-process rows (decoding the JPEG included, as served).
        whole = max((row[2] for row in rows[1:]), key=lambda result: result["rps"])
        per_node = node_times(project, [frame])
        server = start_server(project_dir, log_file=Path(tmp) / "server.log", log_level="INFO")
        paths = [("HTTP JPEG body, context answer", ""),
                 ("HTTP JPEG body, anonymised image (PNG)", "?response_type=image&context_in_body"),
                 ("HTTP JPEG body, anonymised image (JPEG)", "?response_type=image&image_format=jpeg&context_in_body")]
        try:
            for clients in (1, 8):
                for name, query in paths:
                    rows.append((name, clients, with_cpu(lambda q=query, c=clients: asyncio.run(over_http(
                        f"{server.url}/analyze_image", lambda _: {"query": q, "body": jpeg}, c, args.seconds)),
                        server.process.pid)))
        finally:
            server.stop()
            project.close()
    model_h, model_w = loaded.input_size
    print(f"\nfaces@1 ({source_dir.name}): model {loaded.name} v{loaded.version} ({model_w}x{model_h}, "
          f"{loaded.device}, {loaded.precision}), JPEG frames {width}x{height} ({len(jpeg)} bytes), "
          f"{args.seconds:g} s per row, client and server on the same cores; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("faces found: " + ", ".join(f"{r['x']},{r['y']} {r['width']}x{r['height']} ({r['confidence']:.3f})"
                                      for r in rectangles) + "\n")
    print("| path | clients | req/s | p50 ms | p99 ms | ratio to inference ceiling | ratio to whole-node ceiling "
          "| CPU ms/request (HTTP: server + client) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, clients, result in rows:
        if "server_cpu" in result:
            cpu = f"{result['server_cpu']:.1f} + {result['client_cpu']:.1f}"
        else:
            cpu = f"{result['client_cpu']:.1f}" if "client_cpu" in result else "-"
        print(f"| {name} | {clients} | {result['rps']:.1f} | {result['p50']:.2f} | {result['p99']:.2f} | "
              f"{result['rps'] / top['rps']:.2f} | {result['rps'] / whole['rps']:.2f} | {cpu} |")
    print_node_times(per_node)


if __name__ == "__main__":
    main()
