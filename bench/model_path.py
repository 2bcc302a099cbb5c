"""`make bench`, model part: a project's flow over HTTP against two in-process ceilings of its model.

The inference ceiling is an AsyncInferQueue on the same compiled model, fed the same frames already resized to
the model's input, with as many jobs as the device's optimal number of requests. The whole-node ceiling is
`Project.inspect` on the decoded camera frame in this process (1 and 2 threads, the better): the node's resize,
inference and post-processing, the flow and the JSON. The server paths send the frames (shared memory, Bayer
RG8 body, JPEG body) through the project's whole flow at 1 and 8 clients; each row's ratio is given to both.
Per model node, the time of its `run` and how much of it is spent outside inference (Python: fitting the frame,
decoding, post-processing) is measured on one thread.

    .venv/bin/python bench/model_path.py [--project projects/demo] [--frames DIR | --skimage coffee,chelsea]
                                         [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.frames import Frame, mosaic_rggb  # noqa: E402
from appliance.nodes.model import ModelNode  # noqa: E402
from appliance.project import Project  # noqa: E402
from bench.hot_path import in_process, over_http, summary  # noqa: E402
from tests.conftest import start_server  # noqa: E402


def ceiling(loaded, batches: list[np.ndarray], seconds: float) -> dict[str, float]:
    """Inferences per second with every infer request of the compiled model busy."""
    jobs = int(loaded.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    queue = ov.AsyncInferQueue(loaded.compiled, jobs)
    latencies: list[float] = []
    queue.set_callback(lambda request, started: latencies.append(time.perf_counter() - started))
    index = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        queue.start_async({0: batches[index % len(batches)]}, time.perf_counter())
        index += 1
    queue.wait_all()
    result = summary(latencies, time.perf_counter() - started)
    result["jobs"] = jobs
    return result


def node_times(project: Project, frames: list[np.ndarray], repeats: int = 20) -> list[dict[str, object]]:
    """Per model node of the flow, on one thread: ms per frame in its `run`, and in its models' `infer` calls."""
    spent: dict[str, list[float]] = {}
    inferring = [0.0]
    for slot in project.runtime.slots.values():
        loaded = slot.current
        if loaded is None or getattr(loaded, "_bench_wrapped", False):
            continue

        def timed_infer(batch, original=loaded.infer):
            started = time.perf_counter()
            try:
                return original(batch)
            finally:
                inferring[0] += time.perf_counter() - started

        loaded.infer = timed_infer  # type: ignore[method-assign]
        loaded._bench_wrapped = True  # type: ignore[attr-defined]
    for node in project.graph.nodes.values():
        if not isinstance(node, ModelNode):
            continue

        def timed_run(ctx, original=node.run, node_id=node.id):
            inferring[0] = 0.0
            started = time.perf_counter()
            original(ctx)
            spent.setdefault(node_id, []).append(time.perf_counter() - started)
            spent.setdefault(node_id + " infer", []).append(inferring[0])

        node.run = timed_run  # type: ignore[method-assign]
        spent[node.id] = []
    for _ in range(2):  # warm-up
        project.inspect(Frame(frames[0], "bench"), "")
    spent = {key: [] for key in spent}
    for index in range(repeats):
        project.inspect(Frame(frames[index % len(frames)], "bench"), "")
    rows = []
    for node_id, node in project.graph.nodes.items():
        if node_id in spent and spent[node_id]:
            run_ms = 1000 * float(np.median(spent[node_id]))
            infer_ms = 1000 * float(np.median(spent[node_id + " infer"]))
            rows.append({"node": node_id, "type": node.settings.type, "run": run_ms, "infer": infer_ms,
                         "python": run_ms - infer_ms})
    return rows


def whole_node_ceiling(project: Project, frames: list[np.ndarray], seconds: float) -> dict[str, float]:
    """Project.inspect in this process on decoded frames, at 1 and 2 threads: the better one."""
    counter = iter(range(1 << 62))
    best: dict[str, float] | None = None
    for threads in (1, 2):
        result = in_process(project, lambda: Frame(frames[next(counter) % len(frames)], "bench"), threads,
                            seconds / 2)
        result["threads"] = threads
        if best is None or result["rps"] > best["rps"]:
            best = result
    assert best is not None
    return best


def print_node_times(rows: list[dict[str, object]]) -> None:
    print("\n| node | type | run ms p50 | in inference ms | Python outside inference ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['node']} | {row['type']} | {row['run']:.2f} | {row['infer']:.2f} | {row['python']:.2f} |")


def load_frames(project_dir: Path, folder: str | None, pictures: str | None) -> list[np.ndarray]:
    """Up to 8 frames of one size (the first one's): a folder, scikit-image pictures, or the project's images."""
    if pictures:
        from skimage import data

        frames = [cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR) for name in pictures.split(",")]
    else:
        candidates = [Path(folder)] if folder else [project_dir / "images" / "good", project_dir / "images" / "check"]
        paths = next((sorted(c.glob("*.png"))[:8] for c in candidates if c.is_dir() and any(c.glob("*.png"))), [])
        if not paths:
            raise SystemExit(f"no frames in {', '.join(map(str, candidates))}; run `make demo` first")
        frames = [cv2.imread(str(path), cv2.IMREAD_COLOR) for path in paths]
    height, width = frames[0].shape[:2]
    # Bayer mosaics need even sides; one size for all, as a camera sends.
    height, width = height - height % 2, width - width % 2
    return [cv2.resize(frame, (width, height)) for frame in frames]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=str(REPO / "projects" / "demo"))
    parser.add_argument("--frames", help="folder of frames (default: the project's images/good or images/check)")
    parser.add_argument("--skimage", help="comma-separated scikit-image pictures as frames, e.g. coffee,chelsea")
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    source_dir = Path(args.project).resolve()
    config = yaml.safe_load((source_dir / "project.yaml").read_text())
    workdir = tempfile.TemporaryDirectory()
    project_dir = Path(workdir.name) / source_dir.name
    project_dir.mkdir()
    # The same flow and models; the queue deep enough for 8 clients: this measures throughput, not 503s.
    config.update(flow=str((source_dir / config["flow"]).resolve()),
                  models_dir=str((source_dir / config.get("models_dir", "models")).resolve()),
                  limits={**config.get("limits", {}), "queue_depth": 16})
    (project_dir / "project.yaml").write_text(yaml.safe_dump(config))
    frames = load_frames(source_dir, args.frames, args.skimage)
    height, width = frames[0].shape[:2]
    project = Project.load(project_dir)
    project.prepare()
    slots = [slot for slot in project.runtime.slots.values() if slot.current is not None]
    if not slots:
        raise SystemExit("the project's flow has no model")
    loaded = slots[0].current
    model_h, model_w = loaded.input_size
    batches = [cv2.resize(f, (model_w, model_h), interpolation=cv2.INTER_AREA)[None] for f in frames]
    jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for f in frames]
    mosaics = [mosaic_rggb(f).tobytes() for f in frames]
    blocks: list[shared_memory.SharedMemory] = []

    def shm_request(index: int) -> dict:
        while len(blocks) <= index:
            block = shared_memory.SharedMemory(create=True, size=frames[0].nbytes)
            np.ndarray(frames[0].shape, np.uint8, buffer=block.buf)[:] = frames[len(blocks) % len(frames)]
            blocks.append(block)
        return {"query": f"?width={width}&height={height}&name={blocks[index].name}"}

    paths = [
        ("shared memory", "/analyze_image_shared_memory", shm_request),
        ("Bayer RG8 body", "/analyze_raw_image",
         lambda i: {"query": f"?width={width}&height={height}&bayer", "body": mosaics[i % len(mosaics)]}),
        ("JPEG body", "/analyze_image", lambda i: {"query": "", "body": jpegs[i % len(jpegs)]}),
    ]
    top = ceiling(loaded, batches, args.seconds)
    whole = whole_node_ceiling(project, frames, args.seconds)
    per_node = node_times(project, frames)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(project_dir, log_file=Path(tmp) / "server.log", log_level="INFO")
        try:
            for clients in (1, 8):
                for name, endpoint, make_request in paths:
                    rows.append((name, clients, asyncio.run(over_http(server.url + endpoint, make_request, clients,
                                                                      args.seconds))))
        finally:
            server.stop()
            for block in blocks:
                block.close()
                block.unlink()
            project.close()
            workdir.cleanup()
    print(f"\nFlow of {source_dir.name}: model {loaded.name} v{loaded.version} ({model_w}x{model_h}, "
          f"{loaded.device}, {loaded.precision}), camera frames {width}x{height}, {args.seconds:g} s per row\n")
    print("| path | clients | req/s | p50 ms | p99 ms | ratio to inference ceiling | ratio to whole-node ceiling |")
    print("|---|---|---|---|---|---|---|")
    print(f"| in-process inference ceiling (AsyncInferQueue, {top['jobs']} jobs) | - | {top['rps']:.1f} | "
          f"{top['p50']:.2f} | {top['p99']:.2f} | 1.00 | {top['rps'] / whole['rps']:.2f} |")
    print(f"| in-process whole-node ceiling (Project.inspect + JSON, {whole['threads']:g} threads) | - | "
          f"{whole['rps']:.1f} | {whole['p50']:.2f} | {whole['p99']:.2f} | {whole['rps'] / top['rps']:.2f} | 1.00 |")
    for name, clients, result in rows:
        print(f"| {name} | {clients} | {result['rps']:.1f} | {result['p50']:.2f} | {result['p99']:.2f} | "
              f"{result['rps'] / top['rps']:.2f} | {result['rps'] / whole['rps']:.2f} |")
    print_node_times(per_node)


if __name__ == "__main__":
    main()
