"""Frames the appliance acquires itself: a watched folder and a video file, through a real server process, with
the results at a real TCP peer (the outputs), dropped frames counted, and a missing camera reported and retried."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import requests

from tests.conftest import free_port, start_server, write_project
from tests.outputs.test_tcp import Peer

# OK for a bright frame, NG for a dark one; the frame's source and id come back in the output line.
BRIGHTNESS = """
import json
import time
def main(context, form):
    time.sleep(form.get('sleep', 0))
    context['result'] = float(context['image'].mean()) > 100
"""


def flow(sleep: float = 0.0) -> dict:
    return {"nodes": {"verdict": {"type": "code@1", "module": "brightness", "form": {"sleep": sleep}}}}


def tcp_output(peer: Peer) -> dict:
    return {"type": "tcp", "host": "127.0.0.1", "port": peer.port, "template": "$source;$verdict;$data"}


def alternating_video(path, frames: int):
    """An MJPG file of 64x48 frames, dark (20) then bright (220) in turn."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (64, 48))
    for index in range(frames):
        writer.write(np.full((48, 64, 3), 220 if index % 2 else 20, np.uint8))
    writer.release()
    return path


def test_a_watched_folder_inspects_each_new_file_once_and_sorts_it(tmp_path):
    peer = Peer(free_port())
    peer.start()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    project = write_project(tmp_path / "p", flow(), hooks={"brightness": BRIGHTNESS}, outputs=[tcp_output(peer)],
                            sources=[{"type": "folder", "name": "inbox", "path": str(incoming),
                                      "move_to": "done", "poll_s": 0.05, "settle_s": 0.1}])
    server = start_server(project)
    try:
        cv2.imwrite(str(incoming / "a_bright.png"), np.full((40, 60, 3), 220, np.uint8))
        cv2.imwrite(str(incoming / "b_dark.png"), np.full((40, 60, 3), 20, np.uint8))
        lines = peer.wait_for(2)
        found = {json.loads(data)["frame_id"]: verdict for source, verdict, data in (line.split(";", 2)
                                                                                     for line in lines)}
        assert found == {"a_bright.png": "OK", "b_dark.png": "NG"}
        assert {line.split(";")[0] for line in lines} == {"inbox"}
        deadline = time.monotonic() + 10
        while not (incoming / "done" / "ng" / "b_dark.png").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (incoming / "done" / "ok" / "a_bright.png").exists()
        assert (incoming / "done" / "ng" / "b_dark.png").exists()
        assert not list(incoming.glob("*.png"))
        time.sleep(0.5)
        assert len(peer.lines) == 2  # each file once
        health = requests.get(f"{server.url}/health", timeout=10).json()["sources"]["inbox"]
        assert (health["connected"], health["acquired"], health["dropped"]) == (True, 2, 0)
    finally:
        server.stop()
        peer.stop()


def test_a_batch_of_files_copied_in_at_once_waits_on_the_disk_and_none_is_dropped(tmp_path):
    """Eight files arrive in one scan while one inspection at a time takes 50 ms: each waits for the one before it
    (files wait on the disk, not in memory) instead of being dropped and never looked at again."""
    peer = Peer(free_port())
    peer.start()
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    names = [f"part_{index}_{'bright' if index % 2 else 'dark'}.png" for index in range(8)]
    for index, name in enumerate(names):
        cv2.imwrite(str(incoming / name), np.full((40, 60, 3), 220 if index % 2 else 20, np.uint8))
    project = write_project(tmp_path / "p", flow(sleep=0.05), hooks={"brightness": BRIGHTNESS},
                            outputs=[tcp_output(peer)],
                            sources=[{"type": "folder", "name": "inbox", "path": str(incoming), "move_to": "done",
                                      "poll_s": 0.05, "settle_s": 0.05, "in_flight": 1}])
    server = start_server(project)
    try:
        lines = peer.wait_for(8)
        deadline = time.monotonic() + 10
        while len(list((incoming / "done").glob("*/*.png"))) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = requests.get(f"{server.url}/health", timeout=10).json()["sources"]["inbox"]
    finally:
        server.stop()
        peer.stop()
    assert (health["acquired"], health["dropped"], health["failed"]) == (8, 0, 0)
    assert [json.loads(data)["frame_id"] for _, _, data in (line.split(";", 2) for line in lines)] == names
    assert [verdict for _, verdict, _ in (line.split(";", 2) for line in lines)] == ["NG", "OK"] * 4
    assert sorted(path.name for path in (incoming / "done" / "ok").iterdir()) == names[1::2]
    assert sorted(path.name for path in (incoming / "done" / "ng").iterdir()) == names[0::2]


def test_a_video_faster_than_the_flow_drops_frames_and_counts_them(tmp_path):
    peer = Peer(free_port())
    peer.start()
    video = alternating_video(tmp_path / "line.avi", 60)
    # 100 frames/s offered, one inspection at a time taking 50 ms: about half the frames cannot be inspected.
    project = write_project(tmp_path / "p", flow(sleep=0.05), hooks={"brightness": BRIGHTNESS},
                            outputs=[tcp_output(peer)],
                            sources=[{"type": "video", "name": "cam", "url": str(video), "rate": 100,
                                      "in_flight": 1}])
    server = start_server(project)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            health = requests.get(f"{server.url}/health", timeout=10).json()["sources"]["cam"]
            if health["acquired"] >= 60:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        health = requests.get(f"{server.url}/health", timeout=10).json()["sources"]["cam"]
        inspected = len(peer.lines)
        assert health["acquired"] >= 60 and health["dropped"] > 10
        # Every acquired frame was inspected or dropped (one may be in flight, or its line on the way).
        assert 0 <= health["acquired"] - health["dropped"] - inspected <= 1
        assert 10 <= inspected <= 50
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert f'appliance_source_frames_total{{outcome="dropped",source="cam"}} {float(health["dropped"])}' in metrics
        # Frame ids are the video's frame numbers, in order, and the verdicts follow the frames' brightness.
        ids = [json.loads(line.split(";", 2)[2])["frame_id"] for line in peer.lines[:inspected]]
        assert [int(i) for i in ids] == sorted(int(i) for i in ids)
        for line in peer.lines[:inspected]:
            _, verdict, data = line.split(";", 2)
            assert verdict == ("OK" if int(json.loads(data)["frame_id"]) % 2 == 0 else "NG")
    finally:
        server.stop()
        peer.stop()


def test_two_frames_inspected_at_once_reach_the_outputs_in_the_cameras_order(tmp_path):
    """A reject gate shifts parts in the order they pass: a fast frame finishing before the slow one acquired
    before it must still come second, with the counter rising in that order."""
    peer = Peer(free_port())
    peer.start()
    video = alternating_video(tmp_path / "line.avi", 12)
    slow_dark = BRIGHTNESS.replace("time.sleep(form.get('sleep', 0))",
                                   "time.sleep(0.3 if context['image'].mean() < 100 else 0)")
    project = write_project(tmp_path / "p", flow(), hooks={"brightness": slow_dark},
                            outputs=[{**tcp_output(peer), "template": "$verdict;$counter;$data"}],
                            sources=[{"type": "video", "name": "cam", "url": str(video), "rate": 5,
                                      "in_flight": 2}])
    server = start_server(project)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            health = requests.get(f"{server.url}/health", timeout=10).json()["sources"]["cam"]
            if health["acquired"] >= 12 and len(peer.lines) >= health["acquired"] - health["dropped"]:
                break
            time.sleep(0.1)
        lines = [line.split(";", 2) for line in peer.lines]
        frames = [int(json.loads(data)["frame_id"]) for _, _, data in lines]
        verdicts = [verdict for verdict, _, _ in lines]
        # A frame each 200 ms (ids count from 1); dark ones (odd ids) take 300 ms, bright ones none: each bright
        # frame, acquired while the dark one before it is inspected, finishes first.
        assert sum(frame + 1 in frames for frame in frames if frame % 2 == 1) >= 3, frames
        assert frames == sorted(frames), frames
        assert [int(counter) for _, counter, _ in lines] == list(range(1, len(lines) + 1))
        assert verdicts == ["NG" if frame % 2 else "OK" for frame in frames]
    finally:
        server.stop()
        peer.stop()


def test_a_camera_that_is_not_there_is_reported_and_tried_again(tmp_path):
    project = write_project(tmp_path / "p", flow(), hooks={"brightness": BRIGHTNESS},
                            sources=[{"type": "video", "name": "cam", "url": str(tmp_path / "unplugged.avi")}])
    server = start_server(project)
    try:
        time.sleep(2.0)  # opened at 0, 0.5 s, 1.5 s
        health = requests.get(f"{server.url}/health", timeout=10).json()
        assert health["status"] == "ready"
        camera = health["sources"]["cam"]
        assert camera["connected"] is False and camera["failed"] >= 2
        assert camera["last_error"].startswith("OSError: cannot open")
        assert requests.post(f"{server.url}/analyze_image", data=cv2.imencode(".png", np.zeros((4, 4, 3),
                             np.uint8))[1].tobytes(), timeout=10).status_code == 200
    finally:
        server.stop()
