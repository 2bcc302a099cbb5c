"""A camera-loop client: send the images of a folder or the frames of a video file to the appliance's HTTP API.

    python examples/camera_loop.py --source parts/ --as jpeg --url http://127.0.0.1:8000
    python examples/camera_loop.py --source parts/ --rate 10 --as bayer
    python examples/camera_loop.py --source line.mp4 --as bgr --max-frames 100
    python examples/camera_loop.py --source line.mp4 --as shm --shm-group appliance-cameras

Each answer's verdict, rectangles and latency is printed, one line per frame. It needs only OpenCV, numpy and
requests: copy it to the PC that has the images. A camera or stream the appliance should read itself (a GigE Vision
or USB3 Vision camera, a V4L2/UVC camera, RTSP) needs no client: list it under `sources:` in project.yaml
(docs/sources.md), and the appliance acquires, inspects and sends the results to the `outputs:` on its own.

`--as shm` hands each frame over in a /dev/shm block (same machine only). Python creates blocks with mode 0600, so
the appliance can read them only when this script runs as the appliance's user; with `--shm-group GROUP` (the
install's `appliance-cameras`, which the service has) the block is given to that group with mode 0640 right after
it is created, so the script can run as any user of that group (docs/systemd.md).
"""

from __future__ import annotations

import argparse
import grp
import os
import sys
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import requests

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def frames_from(source: str, loop: bool) -> Iterator[tuple[str, np.ndarray]]:
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"no images in {path}")
        while True:
            for file in files:
                image = cv2.imread(str(file), cv2.IMREAD_COLOR)
                if image is not None:
                    yield file.name, image
            if not loop:
                return
    if source.isdigit() or source.startswith("/dev/") or "://" in source:
        raise SystemExit(f"{source} is a camera or a stream: the appliance reads it itself when project.yaml lists "
                         "it under `sources:` (docs/sources.md); this client sends image folders and video files")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise SystemExit(f"cannot open {source} as a video file or an image folder")
    index = 0
    while True:
        ok, image = capture.read()
        if not ok:
            if loop:
                capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                continue
            return
        index += 1
        yield f"frame {index}", image


def to_rggb(bgr: np.ndarray) -> np.ndarray:
    """What an RGGB (Bayer RG8) sensor would deliver for this image; odd edges are cut."""
    h, w = bgr.shape[0] & ~1, bgr.shape[1] & ~1
    bgr = bgr[:h, :w]
    mosaic = np.empty((h, w), np.uint8)
    mosaic[0::2, 0::2] = bgr[0::2, 0::2, 2]
    mosaic[0::2, 1::2] = bgr[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = bgr[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = bgr[1::2, 1::2, 0]
    return mosaic


def request_for(image: np.ndarray, kind: str) -> tuple[str, bytes]:
    if kind == "jpeg":
        return "/analyze_image", cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    if kind == "bayer":
        mosaic = to_rggb(image)
        return f"/analyze_raw_image?width={mosaic.shape[1]}&height={mosaic.shape[0]}&bayer", mosaic.tobytes()
    return f"/analyze_raw_image?width={image.shape[1]}&height={image.shape[0]}", np.ascontiguousarray(image).tobytes()


class SharedFrames:
    """One /dev/shm block, made again when the frame size changes; readable by `group` when one is given."""

    def __init__(self, group: str | None):
        self.gid = grp.getgrnam(group).gr_gid if group else None
        self.block: shared_memory.SharedMemory | None = None

    def request_for(self, image: np.ndarray) -> tuple[str, bytes]:
        image = np.ascontiguousarray(image)
        if self.block is None or self.block.size != image.nbytes:
            self.close()
            self.block = shared_memory.SharedMemory(create=True, size=image.nbytes)
            if self.gid is not None:
                # The umask cannot add group read to Python's 0600, so set group and mode on the block itself.
                path = f"/dev/shm/{self.block.name}"
                os.chown(path, -1, self.gid)
                os.chmod(path, 0o640)
        np.ndarray(image.shape, np.uint8, buffer=self.block.buf)[:] = image
        height, width = image.shape[:2]
        return f"/analyze_image_shared_memory?width={width}&height={height}&name={self.block.name}", b""

    def close(self) -> None:
        if self.block is not None:
            self.block.close()
            self.block.unlink()
            self.block = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="an image folder or a video file")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--as", dest="kind", choices=["bgr", "bayer", "jpeg", "shm"], default="jpeg")
    parser.add_argument("--shm-group", metavar="GROUP", help="with --as shm: make each block readable by this "
                        "group (0640), e.g. appliance-cameras, for an appliance that runs as another user")
    parser.add_argument("--rate", type=float, default=0, help="frames per second (0: as fast as answered)")
    parser.add_argument("--max-frames", type=int, default=0)
    parser.add_argument("--api-key", help="sent as X-API-Key")
    parser.add_argument("--loop", action="store_true", help="start again at the end of a file or folder")
    args = parser.parse_args()
    if args.shm_group and args.kind != "shm":
        parser.error("--shm-group needs --as shm")
    try:
        shared = SharedFrames(args.shm_group) if args.kind == "shm" else None
    except KeyError:
        parser.error(f"no group named {args.shm_group!r}")

    session = requests.Session()
    if args.api_key:
        session.headers["X-API-Key"] = args.api_key
    interval = 1 / args.rate if args.rate > 0 else 0
    counts = {"OK": 0, "NG": 0, "error": 0}
    next_time = time.monotonic()
    try:
        loop(args, session, shared, counts, interval, next_time)
    finally:
        if shared:
            shared.close()
    print(f"done: {counts['OK']} OK, {counts['NG']} NG, {counts['error']} errors", file=sys.stderr)
    return 0


def loop(args: argparse.Namespace, session: requests.Session, shared: SharedFrames | None, counts: dict[str, int],
         interval: float, next_time: float) -> None:
    for sent, (name, image) in enumerate(frames_from(args.source, args.loop), start=1):
        path, body = shared.request_for(image) if shared else request_for(image, args.kind)
        started = time.perf_counter()
        answer = session.post(args.url + path, data=body, timeout=20)
        latency = (time.perf_counter() - started) * 1000
        ctx = answer.json()
        if answer.status_code != 200:
            counts["error"] += 1
            print(f"{name}: error {answer.status_code}: {ctx.get('message')}")
        else:
            verdict = "OK" if ctx.get("result") else "NG"
            counts[verdict] += 1
            boxes = ", ".join(f"{r['classNames'][0]['label']}@{r['x']},{r['y']} {r['width']}x{r['height']}"
                              for r in ctx.get("detectedRectangles", []))
            print(f"{name}: {verdict} {latency:.1f} ms {boxes}")
        if args.max_frames and sent >= args.max_frames:
            break
        if interval:
            next_time += interval
            time.sleep(max(0.0, next_time - time.monotonic()))


if __name__ == "__main__":
    raise SystemExit(main())
