"""Outputs: how late the MQTT message reaches a subscriber after the HTTP answer, and what publishing costs the
inspection's throughput.

A real Mosquitto on loopback and a paho subscriber (on its own thread) on `appliance/#`. The project is
projects/line-io's flow (the dark-spots Code hook on 1920x1080 PNG frames, half of them NG), served twice: with
the MQTT output (QoS 1) and with none. Latency rows send frames paced at 1 and 50 frames/s with one client and
take, for each request id, the subscriber's arrival minus the moment the client had the answer (negative: the
message came before the answer was read). Throughput rows are a closed loop of `--clients` clients for
`--seconds` each, output on and off; the ratio is on / off (goal >= 0.95). Client, server and broker share the
2 cores.

    .venv/bin/python bench/outputs.py [--seconds 4] [--clients 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import start_server  # noqa: E402
from tests.outputs.mqtt_peer import Broker, Subscriber  # noqa: E402


def frames() -> list[bytes]:
    images = []
    for spot in (False, True):
        image = np.full((1080, 1920, 3), 210, np.uint8)
        if spot:
            image[500:530, 900:940] = 20
        images.append(cv2.imencode(".png", image)[1].tobytes())
    return images


def project(folder: Path, outputs: list[dict]) -> Path:
    folder.mkdir(parents=True)
    config = {"name": "line-io", "flow": str(REPO / "flows" / "dark_spots.yaml"),
              "code": {"folder": str(REPO / "projects" / "dark-spots" / "code")}, "outputs": outputs}
    (folder / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def paced(url: str, images: list[bytes], rate: float, seconds: float, subscriber: Subscriber, tag: str) -> dict:
    answered: dict[str, float] = {}
    session = requests.Session()
    start = time.monotonic()
    index = 0
    while time.monotonic() - start < seconds:
        due = start + index / rate
        time.sleep(max(0.0, due - time.monotonic()))
        request_id = f"{tag}-{index}"
        answer = session.post(f"{url}/analyze_image", data=images[index % 2], headers={"X-Request-Id": request_id},
                              timeout=30)
        answer.raise_for_status()
        answered[request_id] = time.monotonic()
        index += 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        arrived = {m.json()["request_id"]: m.at for m in list(subscriber.messages)}
        if all(request_id in arrived for request_id in answered):
            break
        time.sleep(0.01)
    late = sorted((arrived[r] - t) * 1000 for r, t in answered.items() if r in arrived)
    return {"sent": len(answered), "heard": len(late), "median_ms": statistics.median(late),
            "p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))], "max_ms": late[-1]}


def closed_loop(url: str, images: list[bytes], clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def client(slot: int) -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                session.post(f"{url}/analyze_image", data=images[counts[slot] % 2], timeout=30).raise_for_status()
                counts[slot] += 1

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    images = frames()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        broker = Broker(folder / "broker")
        broker.start()
        subscriber = Subscriber(broker.port, "appliance/#").start()
        on = start_server(project(folder / "on", [{"type": "mqtt", "url": broker.url, "qos": 1}]),
                          log_level="WARNING")
        off = start_server(project(folder / "off", []), log_level="WARNING")
        try:
            for _ in range(5):  # warm: the output connects on its first message
                requests.post(f"{on.url}/analyze_image", data=images[0], timeout=30).raise_for_status()
                requests.post(f"{off.url}/analyze_image", data=images[0], timeout=30).raise_for_status()
            print("| row | sent | heard | median ms | p99 ms | max ms |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for rate in (1.0, 50.0):
                row = paced(on.url, images, rate, args.seconds, subscriber, f"r{rate:g}")
                print(f"| MQTT latency, answer -> subscriber, {rate:g} frames/s | {row['sent']} | {row['heard']} | "
                      f"{row['median_ms']:.2f} | {row['p99_ms']:.2f} | {row['max_ms']:.2f} |")
            rates = {}
            for name, server in (("off", off), ("on", on), ("off", off), ("on", on)):
                rates.setdefault(name, []).append(closed_loop(server.url, images, args.clients, args.seconds))
            best = {name: max(values) for name, values in rates.items()}
            print()
            print(f"closed loop, {args.clients} clients, {args.seconds:g} s a row (best of 2): output off "
                  f"{best['off']:.1f} inspections/s, MQTT on {best['on']:.1f} inspections/s, "
                  f"ratio {best['on'] / best['off']:.3f} (goal >= 0.95)")
        finally:
            on.stop()
            off.stop()
            subscriber.stop()
            broker.stop()


if __name__ == "__main__":
    main()
