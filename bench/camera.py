"""Camera acquisition: Aravis's fake GigE Vision camera free-running at 1920x1080 Mono8, 30 frames/s, read by a
genicam source and inspected by the demo's anomaly flow (projects/demo's model `parts`, `make demo`), each verdict
sent to a TCP peer on loopback; and the same with a flow that costs nothing (evaluate@1), for the acquisition alone.

For a fixed count of frames (300: 10 s at 30 frames/s) each row reports what the source acquired, what was inspected,
dropped (the pipeline behind: the source's `in_flight` frames all being inspected and `backlog` newer frames waiting
in the camera's buffers behind the oldest), lost at the host (incomplete frames, frames that found all of Aravis's
buffers taken), the frame rate the camera kept, and the latency from
acquisition to the verdict at the peer: from the moment this PC had the whole frame (`timestamp`), and from the
camera's own stamp (the fake camera stamps a frame with this PC's clock when it starts drawing it, so that column
adds the drawing and the 2 MB transfer over the loopback), and the CPU the appliance and the camera used. Camera,
appliance and peer share the 2 cores.

`--project` takes the anomaly flow and models of another project than projects/demo (e.g. a copy with a `fast`
model: `appliance train anomaly --good projects/demo/images/good --mode fast --out /tmp/demo/models/parts`, beside
a copy of projects/demo/project.yaml whose `flow` points at flows/demo.yaml); `--backlog` and `--buffers` are the
genicam source's settings of those names (docs/sources.md).

    .venv/bin/python bench/camera.py [--frames 300] [--rate 30] [--width 1920] [--height 1080] [--project DIR]
                                     [--in-flight 2] [--backlog 3] [--buffers 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import start_server  # noqa: E402
from tests.sources.test_genicam import ADDRESS, FakeCamera  # noqa: E402


class VerdictListener:
    """A TCP peer (a PLC's or MES's socket) that stamps each line with this PC's clock when it arrives."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection, connection.makefile("r") as lines:
            for line in lines:
                self.lines.append((time.time(), line.strip()))

    def stop(self) -> None:
        self.listener.close()


# The acquisition alone: a flow that inspects nothing (no rectangle, so OK).
ACQUISITION_ONLY = {"nodes": {"verdict": {"type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}}
FLOW_NAMES = ("acquisition only (evaluate@1)", "demo anomaly (anomaly@1 + evaluate@1)")


def demo_flow_and_models(folder: Path) -> tuple[str, str]:
    """The flow file and models folder of the project in ``folder`` (projects/demo, or a copy of it), as absolute
    paths: the bench writes its own project.yaml elsewhere."""
    config = yaml.safe_load((folder / "project.yaml").read_text())
    flow, models = config.get("flow"), config.get("models_dir", "models")
    if not isinstance(flow, str):
        raise SystemExit(f"{folder / 'project.yaml'}: the bench needs `flow` as a file name")
    return str((folder / flow).resolve()), str((folder / models).resolve())


def project(folder: Path, args: argparse.Namespace, flow: str | dict, peer_port: int) -> Path:
    folder.mkdir(parents=True)
    config = {"name": "camera-bench", "flow": flow, "models_dir": args.models_dir,
              "sources": [{"type": "genicam", "name": "cam", "camera": ADDRESS, "pixel_format": "Mono8",
                           "width": args.width, "height": args.height, "frame_rate": args.rate,
                           "in_flight": args.in_flight, "packet_size": args.packet_size,
                           **{key: value for key, value in (("backlog", args.backlog), ("buffers", args.buffers))
                              if value is not None}}],
              "outputs": [{"type": "tcp", "host": "127.0.0.1", "port": peer_port, "template": "$verdict;$data"}]}
    (folder / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def source_health(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=10).json()["sources"]["cam"]


def inspected(url: str) -> float:
    """The source's `inspected` count from /metrics (read when the count is reached: a metrics page costs the
    server more than a frame does, so the run itself polls /health only)."""
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    found = re.search(r'appliance_source_frames_total\{outcome="inspected",source="cam"\} ([0-9.e+]+)', metrics)
    return float(found.group(1)) if found else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system time of a process so far (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def unwrapped(frame_ids: list[int]) -> list[int]:
    """GigE Vision 1 frame ids count 1..65535 and wrap (0 is never used); the fake camera starts near the top."""
    out, offset, previous = [], 0, None
    for frame_id in frame_ids:
        if previous is not None and frame_id + offset < previous - 30000:
            offset += 65535
        previous = frame_id + offset
        out.append(previous)
    return out


def run(args: argparse.Namespace, folder: Path, name: str, flow: str | dict) -> str:
    """One run of `args.frames` frames through ``flow``: its table row, and a line on the CPU used."""
    camera = FakeCamera()
    camera.start()
    peer = VerdictListener()
    server = start_server(project(folder, args, flow, peer.port), log_level="WARNING")
    assert camera.process is not None
    try:
        started = time.monotonic()
        cpu_before = cpu_seconds(server.process.pid), cpu_seconds(camera.process.pid)
        deadline = started + args.frames / args.rate * 3 + 30
        while time.monotonic() < deadline:
            if source_health(server.url)["acquired"] >= args.frames:
                break
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        server_cpu = cpu_seconds(server.process.pid) - cpu_before[0]
        camera_cpu = cpu_seconds(camera.process.pid) - cpu_before[1]
        camera.kill()  # the count is reached: no more frames
        while time.monotonic() < deadline:  # every acquired frame inspected or dropped, its line at the peer
            state, done = source_health(server.url), inspected(server.url)
            if state["acquired"] == done + state["dropped"] and len(peer.lines) >= done:
                break
            time.sleep(0.1)
    finally:
        server.stop()
        camera.kill()
        peer.stop()
    data = [json.loads(line.split(";", 1)[1]) for _, line in peer.lines]
    from_host = [(arrived - frame["timestamp"]) * 1000 for (arrived, _), frame in zip(peer.lines, data, strict=True)]
    from_camera = [(arrived - frame["camera_timestamp_ns"] / 1e9) * 1000
                   for (arrived, _), frame in zip(peer.lines, data, strict=True)]
    ids = sorted(unwrapped([int(frame["frame_id"]) for frame in data]))
    kept_rate = (ids[-1] - ids[0]) / (max(f["timestamp"] for f in data) - min(f["timestamp"] for f in data))
    return (f"| {name} | {kept_rate:.1f} | {state['acquired']} | {int(done)} | {state['dropped']} | "
            f"{state['incomplete']} | {state['underruns']} | {statistics.median(from_host):.1f} | "
            f"{percentile(from_host, 0.99):.1f} | {statistics.median(from_camera):.1f} | "
            f"{percentile(from_camera, 0.99):.1f} | {server_cpu / elapsed * 100:.0f} | "
            f"{server_cpu / max(1, state['acquired']) * 1000:.1f} | {camera_cpu / elapsed * 100:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--backlog", type=int, help="the genicam source's `backlog` (default: its default)")
    parser.add_argument("--buffers", type=int, help="the genicam source's `buffers` (default: its default)")
    # The loopback's MTU is 64 KiB: jumbo-sized packets, as a camera network with jumbo frames has them.
    parser.add_argument("--packet-size", type=int, default=8192)
    parser.add_argument("--project", type=Path, default=REPO / "projects" / "demo",
                        help="the project whose flow and models the anomaly row runs (default: projects/demo)")
    args = parser.parse_args()
    demo_flow, args.models_dir = demo_flow_and_models(args.project)
    if not (Path(args.models_dir) / "parts" / "current").is_file():
        raise SystemExit(f"{args.models_dir} has no model `parts`: run `make demo` first (or train one there)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(args, Path(tmp) / str(index), name, flow)
                for index, (name, flow) in enumerate(zip(FLOW_NAMES, (ACQUISITION_ONLY, demo_flow), strict=True))]
    model_version = (Path(args.models_dir) / "parts" / "current").read_text().strip()
    print(f"fake GigE Vision camera {args.width}x{args.height} Mono8 at {args.rate:g} frames/s asked, {args.frames} "
          f"frames per row, packets of {args.packet_size} bytes, in_flight {args.in_flight}, backlog "
          f"{'default' if args.backlog is None else args.backlog}; model {args.models_dir}/parts version "
          f"{model_version}; load average before {load_before:.1f} on {os.cpu_count()} cores")
    print()
    print("| flow | frames/s kept | acquired | inspected | dropped (behind) | incomplete | underruns | "
          "p50 ms from host | p99 ms from host | p50 ms from camera | p99 ms from camera | appliance CPU % | "
          "appliance CPU ms per frame | camera CPU % |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
