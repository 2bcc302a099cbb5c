"""`make bench`, KServe part: the appliance's `kserve` dialect against KServe's own `ModelServer` serving the same
OpenVINO IR (EfficientNet-lite0, the store's version), both called by `tritonclient` with binary tensors.

What a plant would run instead of the appliance's KServe API is KServe's Python server with an OpenVINO model
(bench/kserve_peer.py; `kserve` lives in a throwaway venv this script makes, never in the appliance's
dependencies). Each row is a closed loop of N client threads, each with its own tritonclient, sending scikit-image's
coffee as the model takes it (centre crop, 224x224, u8 BGR NHWC) and reading the probabilities back as binary data.
Clients and servers share the machine's cores. The ratio is the appliance's req/s over the peer's at the same
number of clients (goal >= 1.5, issue 12); the in-process ceiling (every infer request busy, no HTTP) is listed.

The same run measures the remote backend (the `kserve` firmware profile, runtime/remote.py): the classify flow
(flows/classify_objects.yaml, scikit-image's coffee as a raw BGR body to /analyze_raw_image) served by an appliance
whose model runs in-process, and by appliances with the `kserve` profile sending the inference to the KServe peer
and to the first appliance's `kserve` API; each row's p50 overhead and throughput as a ratio to in-process.

    .venv/bin/python bench/kserve.py [--seconds 4] [--venv DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import requests
import tritonclient.http as httpclient
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.config.loader import load_project_files  # noqa: E402
from appliance.project import Project  # noqa: E402
from bench.dialects import cpu_seconds  # noqa: E402
from bench.hot_path import over_http, summary  # noqa: E402
from bench.model_path import ceiling  # noqa: E402
from tests.conftest import free_port, start_server  # noqa: E402

MODEL = "efficientnet_lite0"
FLOW = REPO / "flows" / "classify_objects.yaml"
KSERVE = "kserve==0.21.0"
# Where the peer's venv is kept between runs (a few hundred MB; made on the first run, about a minute).
DEFAULT_VENV = Path(os.environ.get("APPLIANCE_KSERVE_VENV", Path(tempfile.gettempdir()) / "appliance-bench-kserve"))


def peer_python(venv: Path) -> Path:
    """The peer venv's python with kserve and the appliance's own OpenVINO version, made or fixed if needed."""
    python = venv / "bin" / "python"
    wanted = [KSERVE, f"openvino=={importlib.metadata.version('openvino')}"]
    probe = "import importlib.metadata as m; print(f\"kserve=={m.version('kserve')} openvino=={m.version('openvino')}\")"
    if python.exists():
        found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.split() == wanted:
            return python
    print(f"installing {' '.join(wanted)} into {venv} (the KServe peer's own venv)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted], check=True)
    return python


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the KServe peer exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the KServe peer was not ready within {timeout:g} s")


def closed_loop(address: str, frame: np.ndarray, clients: int, seconds: float, server_pid: int) -> dict[str, float]:
    """``clients`` threads inferring in a loop for ``seconds`` after one warm-up call each."""
    latencies: list[float] = []
    tops: set[int] = set()
    lock = threading.Lock()
    window: dict[str, float] = {}

    def begin() -> None:
        window["cpu"] = cpu_seconds(server_pid)
        window["start"] = time.perf_counter()
        window["end"] = window["start"] + seconds

    barrier = threading.Barrier(clients, action=begin)

    def client() -> None:
        mine: list[float] = []
        with httpclient.InferenceServerClient(address, connection_timeout=30, network_timeout=30) as own:
            given = httpclient.InferInput("input", list(frame.shape), "UINT8")
            given.set_data_from_numpy(frame, binary_data=True)
            answer = own.infer(MODEL, [given])
            barrier.wait()
            while time.perf_counter() < window["end"]:
                started = time.perf_counter()
                answer = own.infer(MODEL, [given])
                mine.append(time.perf_counter() - started)
        scores = answer.as_numpy(answer.get_response()["outputs"][0]["name"])
        with lock:
            latencies.extend(mine)
            tops.add(int(np.argmax(scores)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = summary(latencies, time.perf_counter() - window["start"])
    result["server_cpu_ms"] = (cpu_seconds(server_pid) - window["cpu"]) * 1000 / max(1, len(latencies))
    (result["top"],) = tops  # every client saw the same best class, or this fails
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the KServe peer's venv (made if absent)")
    args = parser.parse_args()
    from skimage import data

    python = peer_python(args.venv)
    coffee = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)
    height, width = coffee.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    frame = cv2.resize(coffee[top:top + side, left:left + side], (224, 224), interpolation=cv2.INTER_AREA)[None]
    rows: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        project_dir = Path(tmp) / "kserve"
        project_dir.mkdir()
        # The queue deep enough for 8 clients: this measures throughput, not 503s. PEKAT's API too: the same
        # server is the in-process twin of the remote backend's rows.
        (project_dir / "project.yaml").write_text(yaml.safe_dump({
            "name": "kserve", "flow": str(FLOW), "models_dir": str(REPO / "models"), "apis": ["pekat", "kserve"],
            "limits": {"queue_depth": 16}}))
        project = Project.load(project_dir)
        project.prepare()
        loaded = project.runtime.slots[MODEL].current
        assert loaded is not None
        top_row = ceiling(loaded, [frame], args.seconds)
        network = REPO / "models" / MODEL / loaded.version / "model.xml"
        properties = dict(load_project_files(project_dir).profile.properties)
        project.close()

        port = free_port()
        peer_log = Path(tmp) / "peer.log"
        with open(peer_log, "wb") as log:
            # -P: not the script's folder first on sys.path, where bench/kserve.py would shadow the kserve package.
            peer = subprocess.Popen([str(python), "-P", str(REPO / "bench" / "kserve_peer.py"), str(network), MODEL,
                                     str(port), json.dumps(properties)], stdout=log, stderr=subprocess.STDOUT)
        server = start_server(project_dir, log_file=Path(tmp) / "server.log", log_level="INFO")
        remote_servers = []
        remote_rows: list[tuple[str, int, dict[str, float]]] = []
        try:
            wait_ready(f"http://127.0.0.1:{port}", peer, peer_log)
            for clients in (1, 8):
                # Alternating, so that a slower minute of the shared machine does not fall on one side only.
                rows.append(("appliance kserve dialect", clients,
                             closed_loop(f"127.0.0.1:{server.port}", frame, clients, args.seconds,
                                         server.process.pid)))
                rows.append((f"KServe ModelServer ({KSERVE})", clients,
                             closed_loop(f"127.0.0.1:{port}", frame, clients, args.seconds, peer.pid)))
            remotes = {"in-process (cpu profile)": server}
            for name, url in (("kserve profile -> KServe ModelServer", f"http://127.0.0.1:{port}"),
                              ("kserve profile -> another appliance", server.url)):
                remote_dir = Path(tmp) / f"remote-{len(remotes)}"
                remote_dir.mkdir()
                (remote_dir / "project.yaml").write_text(yaml.safe_dump({
                    "name": remote_dir.name, "flow": str(FLOW), "models_dir": str(REPO / "models"),
                    "firmware_profile": "kserve", "limits": {"queue_depth": 16}}))
                remote_servers.append(start_server(remote_dir, log_file=remote_dir / "server.log", log_level="INFO",
                                                   env={"APPLIANCE_KSERVE_URL": url}))
                remotes[name] = remote_servers[-1]
            body = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)
            query = f"/analyze_raw_image?width={body.shape[1]}&height={body.shape[0]}"
            for clients in (1, 8):
                for name, serving in remotes.items():
                    remote_rows.append((name, clients, asyncio.run(over_http(
                        serving.url + query, lambda _: {"query": "", "body": body.tobytes()}, clients, args.seconds))))
        finally:
            for started in (*remote_servers, server):
                started.stop()
            peer.terminate()
            peer.wait(30)
    print(f"\n{MODEL} v{loaded.version} ({loaded.device}, {loaded.precision}, {json.dumps(properties)}), coffee "
          f"224x224 u8 BGR as binary tensors, tritonclient {importlib.metadata.version('tritonclient')}; "
          f"{args.seconds:g} s per row\n")
    print("| server | clients | req/s | p50 ms | p99 ms | ratio to KServe (req/s) | ratio to ceiling "
          "| server CPU ms per request | top class |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| in-process ceiling (AsyncInferQueue, {top_row['jobs']} jobs) | - | {top_row['rps']:.1f} | "
          f"{top_row['p50']:.2f} | {top_row['p99']:.2f} | - | 1.00 | - | - |")
    peers = {clients: result for name, clients, result in rows if name.startswith("KServe")}
    for name, clients, result in rows:
        print(f"| {name} | {clients} | {result['rps']:.1f} | {result['p50']:.2f} | {result['p99']:.2f} | "
              f"{result['rps'] / peers[clients]['rps']:.2f} | {result['rps'] / top_row['rps']:.2f} | "
              f"{result['server_cpu_ms']:.1f} | {int(result['top'])} |")
    print(f"\nRemote backend: the classify flow over /analyze_raw_image (coffee {body.shape[1]}x{body.shape[0]} raw "
          f"BGR), inference in-process or through the kserve profile; {args.seconds:g} s per row\n")
    print("| inference | clients | req/s | p50 ms | p99 ms | overhead p50 ms | throughput ratio to in-process |")
    print("|---|---|---|---|---|---|---|")
    local = {clients: result for name, clients, result in remote_rows if name.startswith("in-process")}
    for name, clients, result in remote_rows:
        print(f"| {name} | {clients} | {result['rps']:.1f} | {result['p50']:.2f} | {result['p99']:.2f} | "
              f"{result['p50'] - local[clients]['p50']:+.2f} | {result['rps'] / local[clients]['rps']:.2f} |")


if __name__ == "__main__":
    main()
