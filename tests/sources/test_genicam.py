"""The genicam source against Aravis's fake GigE Vision camera (`arv-fake-gv-camera-0.8` from aravis-tools) on
127.0.0.1, started by each test and killed after it, through a real server process, with the results at a real
TCP peer. What the camera holds is read back with Aravis's own `arv-tool-0.8`.

The fake camera draws a known pattern (aravis 0.8.26, src/arvfakecamera.c, arv_fake_camera_diagonal_ramp): the
pixel at (x, y) of frame number f is index = (x + y + f) % 255 times scale = 1 + gain + log10(exposure_us / 10000),
truncated to 0-255: the index itself in Mono8, and the colour jet_colormap[index] in RGB8 and Bayer formats.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import yaml

from appliance import frames
from tests.conftest import REPO, free_port, needs_tool, start_server, write_project
from tests.outputs.mqtt_peer import Broker, Subscriber
from tests.outputs.test_tcp import Peer

FAKE_CAMERA = "arv-fake-gv-camera-0.8"
ARV_TOOL = "arv-tool-0.8"
# The fake camera serves GigE Vision's control port 3956 on one address; only 127.0.0.1 exists on loopback here.
ADDRESS = "127.0.0.1"
SERIAL = "APPL01"


def _missing() -> list[str]:
    missing = [command for command in (FAKE_CAMERA, ARV_TOOL) if shutil.which(command) is None]
    try:
        from appliance.sources.genicam import load_aravis

        load_aravis()
    except ImportError:
        missing.append("Aravis's GObject introspection (gir1.2-aravis-0.8, python3-gi)")
    return missing


# Skip only where nothing installed them; CI runs `make test-tools` and sets APPLIANCE_REQUIRE_TOOLS=1.
needs_camera = pytest.mark.skipif(bool(_missing()) and os.environ.get("APPLIANCE_REQUIRE_TOOLS") != "1",
                                  reason=f"needs {', '.join(_missing())} (`make test-tools` installs them)")


class FakeCamera:
    """Aravis's fake GigE Vision camera on 127.0.0.1 with our serial number, as a process of the test's own."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([FAKE_CAMERA, "-i", ADDRESS, "-s", SERIAL], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else ""
                # It prints "Failed to start camera" and exits 0 when the address's port 3956 is taken.
                raise RuntimeError(f"{FAKE_CAMERA} -i {ADDRESS} exited: {output.strip()!r}; is another fake camera "
                                   f"running on {ADDRESS}?")
            if self.read("DeviceID").get("DeviceID") == SERIAL:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{FAKE_CAMERA} did not answer on {ADDRESS}")

    def read(self, *features: str) -> dict[str, str]:
        """Feature values as the camera holds them, read by arv-tool-0.8 (another GigE Vision client)."""
        result = subprocess.run([ARV_TOOL, "-a", ADDRESS, "control", *features], capture_output=True, text=True,
                                timeout=20)
        return dict(re.findall(r"^(\w+) = (\S+)", result.stdout, re.MULTILINE))

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()


@pytest.fixture
def camera():
    started = FakeCamera()
    started.start()
    yield started
    started.kill()


@pytest.fixture
def peer():
    started = Peer(free_port())
    started.start()
    yield started
    started.stop()


# Saves the first frames the flow sees, named by their camera frame id, and passes every frame.
SAVE_FRAMES = """
import json
import os
import numpy as np
def main(context, form):
    frame_id = json.loads(context['data'])['frame_id']
    if len(os.listdir(form['folder'])) < form['keep']:
        np.save(os.path.join(form['folder'], frame_id + '.npy'), context['image'])
    context['result'] = True
"""


def camera_project(folder: Path, peer: Peer | None = None, keep: int = 6, **camera: object) -> tuple[Path, Path]:
    saved = folder / "frames"
    saved.mkdir(parents=True)
    flow = {"nodes": {"save": {"type": "code@1", "module": "save_frames",
                               "form": {"folder": str(saved), "keep": keep}}}}
    outputs = [{"type": "tcp", "host": "127.0.0.1", "port": peer.port, "template": "$source;$verdict;$data"}
               ] if peer else []
    source = {"type": "genicam", "name": "cam", "camera": ADDRESS, "width": 64, "height": 48, **camera}
    return write_project(folder / "p", flow, hooks={"save_frames": SAVE_FRAMES}, outputs=outputs,
                         sources=[source]), saved


def saved_frames(folder: Path, count: int, seconds: float = 20) -> dict[int, np.ndarray]:
    deadline = time.monotonic() + seconds
    while len(list(folder.glob("*.npy"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # the last file's write
    return {int(path.stem): np.load(path) for path in folder.glob("*.npy")}


def ramp(frame_id: int, width: int = 64, height: int = 48) -> np.ndarray:
    """The fake camera's index image: (x + y + frame id) % 255."""
    y, x = np.mgrid[0:height, 0:width]
    return (x + y + frame_id) % 255


def jet(index: np.ndarray) -> np.ndarray:
    """The fake camera's jet_colormap as R, G, B per index: the table of arvfakecamera.c, which is exactly these
    clipped ramps of slope 4 (checked against all 256 entries of aravis 0.8.26)."""
    four = 4 * index.astype(np.int64)
    red = np.minimum(four - 380, 1148 - four)
    green = np.minimum(four - 124, 892 - four)
    blue = np.minimum(four + 132, 636 - four)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def health(server, source: str = "cam") -> dict:
    return requests.get(f"{server.url}/health", timeout=10).json()["sources"][source]


def wait_for_health(server, done, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        state = health(server)
        if done(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


@needs_camera
def test_free_run_frames_reach_the_flow_and_the_outputs_with_the_cameras_frame_id_and_clock(tmp_path, camera, peer):
    # One frame inspected at a time: the verdicts reach the peer in the camera's order.
    project, saved = camera_project(tmp_path, peer, frame_rate=20, in_flight=1)
    server = start_server(project)
    try:
        lines = peer.wait_for(5)
        assert len(lines) >= 5
        found = saved_frames(saved, 5)
        state = health(server)
    finally:
        server.stop()
    assert state["connected"] is True and state["acquired"] >= 5 and state["last_error"] is None
    # What the camera holds after the settings were written, as it reports it.
    assert state["camera"] == {"device_id": SERIAL, "vendor": "Aravis", "model": "Fake", "pixel_format": "Mono8",
                               "width": 64, "height": 48, "offset_x": 0, "offset_y": 0, "exposure_us": 10000.0,
                               "gain": 0.0, "packet_size": 1400, "frame_rate": 20.0}
    frame_ids = []
    for line in lines[:5]:
        source, verdict, data = line.split(";", 2)
        context = json.loads(data)
        assert (source, verdict, context["source"]) == ("cam", "OK", "cam")
        frame_ids.append(int(context["frame_id"]))
        # The host's clock when the frame was complete, and the camera's own (the fake's counts from the epoch).
        assert abs(context["timestamp"] - time.time()) < 60
        assert 0 <= context["timestamp"] - context["camera_timestamp_ns"] / 1e9 < 1
    assert frame_ids == sorted(frame_ids) and len(set(frame_ids)) == 5
    # Each frame is the camera's ramp for its own frame id, exactly, in every channel of the BGR frame.
    assert len(found) >= 5
    for frame_id, image in found.items():
        assert image.shape == (48, 64, 3)
        for channel in range(3):
            np.testing.assert_array_equal(image[:, :, channel], ramp(frame_id))


@needs_camera
def test_mono8_frames_reach_a_flow_that_takes_gray_as_the_camera_sent_them(tmp_path, camera):
    # No Code hook and no colour fill: every node gives the same result on gray as on its BGR conversion, so the
    # frame is not converted (the 1080p conversion costs a worker 0.8 ms per frame). /last_image shows the image the
    # flow ended with: the crop of the camera's gray ramp, one channel.
    flow = {"nodes": {"part": {"type": "crop@1", "x": 8, "y": 4, "width": 48, "height": 40, "next": ["verdict"]},
                      "verdict": {"type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}}
    source = {"type": "genicam", "name": "cam", "camera": ADDRESS, "width": 64, "height": 48, "frame_rate": 20}
    server = start_server(write_project(tmp_path / "p", flow, sources=[source]))
    try:
        state = wait_for_health(server, lambda state: state["acquired"] >= 3)
        answer = requests.get(f"{server.url}/last_image?response_type=image&context_in_body", timeout=10)
    finally:
        server.stop()
    assert state["acquired"] >= 3 and answer.status_code == 200
    image_length = int(answer.headers["ImageLen"])
    image = cv2.imdecode(np.frombuffer(answer.content[:image_length], np.uint8), cv2.IMREAD_UNCHANGED)
    context = json.loads(answer.content[image_length:])
    assert context["result"] is True and context["imageShape"] == {"height": 48, "width": 64}
    assert image.shape == (40, 48)
    np.testing.assert_array_equal(image, ramp(int(json.loads(context["data"])["frame_id"]))[4:44, 8:56])


@needs_camera
@pytest.mark.parametrize("pixel_format", ["RGB8", "BayerRG8"])
def test_colour_frames_reach_the_flow_as_bgr_in_the_cameras_colours(tmp_path, camera, pixel_format):
    project, saved = camera_project(tmp_path, pixel_format=pixel_format, frame_rate=20)
    server = start_server(project)
    try:
        found = saved_frames(saved, 3)
    finally:
        server.stop()
    assert len(found) >= 3
    for frame_id, image in found.items():
        colours = jet(ramp(frame_id))  # R, G, B of each pixel as the camera draws it
        if pixel_format == "RGB8":
            np.testing.assert_array_equal(image, colours[:, :, ::-1])
            continue
        # The fake camera's BayerRG8 mosaic puts the colour's blue on the even-row, even-column sites and its red on
        # the odd ones (arvfakecamera.c: `if (x & 1) { if (y & 1) r ...} else { if (y & 1) g else b }`), where a
        # BayerRG8 sensor has its red and blue filters. Demosaiced as the format says (red top-left), the frame
        # has the camera's red and blue channels swapped: exactly what this sensor would show.
        mosaic = colours[:, :, 1].copy()
        mosaic[0::2, 0::2] = colours[0::2, 0::2, 2]
        mosaic[1::2, 1::2] = colours[1::2, 1::2, 0]
        np.testing.assert_array_equal(image, frames.demosaic_rggb(mosaic))
        # Inside OpenCV's one-pixel border (copied from its neighbours), the samples the sensor has are kept where
        # it has them: the red sites' in the red channel, the blue sites' in the blue one, the green sites' in green.
        inside = (slice(2, -2), slice(2, -2))
        np.testing.assert_array_equal(image[inside][0::2, 0::2, 2], colours[inside][0::2, 0::2, 2])
        np.testing.assert_array_equal(image[inside][1::2, 1::2, 0], colours[inside][1::2, 1::2, 0])
        np.testing.assert_array_equal(image[inside][0::2, 1::2, 1], colours[inside][0::2, 1::2, 1])


# Sleeps on the frames whose camera frame id is a multiple of `every` (all with every 1), passes every frame.
SLEEP_ON_SOME_FRAMES = """
import json
import time
def main(context, form):
    if int(json.loads(context['data'])['frame_id']) % form['every'] == 0:
        time.sleep(form['seconds'])
    context['result'] = True
"""


def sleepy_camera_project(folder: Path, peer: Peer, seconds: float, every: int, **camera: object) -> Path:
    flow = {"nodes": {"sleep": {"type": "code@1", "module": "sleepy", "form": {"seconds": seconds, "every": every}}}}
    source = {"type": "genicam", "name": "cam", "camera": ADDRESS, "width": 64, "height": 48, "frame_rate": 20,
              "in_flight": 1, **camera}
    return write_project(folder, flow, hooks={"sleepy": SLEEP_ON_SOME_FRAMES}, sources=[source],
                         outputs=[{"type": "tcp", "host": "127.0.0.1", "port": peer.port, "template": "$data"}])


@needs_camera
@pytest.mark.parametrize("backlog", [4, 0])
def test_frames_that_come_while_the_inspection_is_busy_wait_in_the_cameras_buffers_within_the_backlog(
        tmp_path, camera, peer, backlog):
    # Every tenth frame takes 150 ms, three frame periods at 20 frames/s, then the flow catches up. With a backlog,
    # the frames that come meanwhile wait in Aravis's buffers and are all inspected, in order; with none, they are
    # dropped as they come.
    server = start_server(sleepy_camera_project(tmp_path / "p", peer, seconds=0.15, every=10, backlog=backlog))
    try:
        state = wait_for_health(server, lambda state: state["acquired"] >= 30)
        lines = peer.wait_for(state["acquired"] - state["dropped"] - 1)
    finally:
        server.stop()
    frame_ids = [int(json.loads(line)["frame_id"]) for line in lines]
    assert state["acquired"] >= 30 and (state["underruns"], state["incomplete"]) == (0, 0)
    if backlog:
        assert state["dropped"] == 0
        assert frame_ids == list(range(frame_ids[0], frame_ids[0] + len(frame_ids)))
    else:
        # Two frames come during each slow one: dropped, and missing at the peer.
        assert state["dropped"] >= 4
        assert frame_ids == sorted(frame_ids) and frame_ids[-1] - frame_ids[0] >= len(frame_ids) + 3


@needs_camera
def test_a_camera_faster_than_the_inspection_drops_the_oldest_frames_and_never_runs_out_of_buffers(
        tmp_path, camera, peer):
    # Each frame takes 200 ms at 20 frames/s: three frames in four cannot be inspected. Two wait behind the oldest
    # (backlog 2) in the four buffers, so Aravis always has one to receive into: the frames dropped are counted as
    # dropped, none is lost at this PC for want of a buffer.
    server = start_server(sleepy_camera_project(tmp_path / "p", peer, seconds=0.2, every=1, backlog=2, buffers=4))
    try:
        state = wait_for_health(server, lambda state: state["acquired"] >= 40, seconds=30)
        inspected = len(peer.wait_for(state["acquired"] - state["dropped"] - 1))
        state = health(server)
    finally:
        server.stop()
    assert state["acquired"] >= 40 and state["underruns"] == 0
    assert state["dropped"] >= state["acquired"] // 2
    # Every frame acquired is inspected (its line at the peer) or dropped; one may still be in the flow.
    assert 0 <= state["acquired"] - state["dropped"] - inspected <= 1


@needs_camera
def test_exposure_gain_and_packet_size_are_written_to_the_camera_and_read_back(tmp_path, camera):
    # The fake camera's gain is a whole number (GainRaw): it keeps 2 of the 2.6 asked.
    project, saved = camera_project(tmp_path, frame_rate=20, exposure_us=20000, gain=2.6, packet_size=8000)
    server = start_server(project)
    try:
        found = saved_frames(saved, 2)
        state = health(server)
    finally:
        server.stop()
    # Read once the appliance let go of the camera (a second client waits seconds for an answer while it streams).
    held = camera.read("ExposureTimeAbs", "GainRaw", "TriggerMode", "AcquisitionFrameRate", "GevSCPSPacketSize")
    assert held == {"ExposureTimeAbs": "20000", "GainRaw": "2", "TriggerMode": "Off", "AcquisitionFrameRate": "20",
                    "GevSCPSPacketSize": "8000"}
    assert (state["camera"]["exposure_us"], state["camera"]["gain"], state["camera"]["packet_size"]) == (
        20000.0, 2.0, 8000)
    # And the camera draws with them: scale = 1 + gain + log10(exposure / 10000), truncated to 0-255.
    scale = 1.0 + 2 + math.log10(20000 / 10000.0)
    assert len(found) >= 2
    for frame_id, image in found.items():
        expected = np.clip(ramp(frame_id) * scale, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(image[:, :, 0], expected)


@needs_camera
def test_software_trigger_takes_exactly_one_frame_per_trigger(tmp_path, camera, peer):
    project, _ = camera_project(tmp_path, peer, trigger="software")
    config = yaml.safe_load((project / "project.yaml").read_text())
    (project / "project.yaml").write_text(yaml.safe_dump({**config, "api_key": "line-key"}))
    server = start_server(project)
    try:
        time.sleep(1.0)
        state = health(server)
        assert (state["connected"], state["acquired"], state["camera"]["trigger_source"]) == (True, 0, "Software")
        assert peer.lines == []
        # A trigger makes a part inspected and reported to the line: it needs the project's key.
        assert requests.post(f"{server.url}/sources/cam/trigger", timeout=10).status_code == 401
        for count in (1, 2, 3):
            answer = requests.post(f"{server.url}/sources/cam/trigger", headers={"X-API-Key": "line-key"},
                                   timeout=10)
            assert answer.status_code == 200
            assert answer.json() == {"status": 200, "message": "source cam: trigger sent",
                                     "data": {"source": "cam", "triggers": count}}
            assert len(peer.wait_for(count)) == count
        time.sleep(0.5)
        assert len(peer.lines) == 3
        frame_ids = [int(json.loads(line.split(";", 2)[2])["frame_id"]) for line in peer.lines]
        assert frame_ids == [frame_ids[0], frame_ids[0] + 1, frame_ids[0] + 2]
        state = health(server)
        assert (state["acquired"], state["triggers"], state["dropped"]) == (3, 3, 0)

        unknown = requests.post(f"{server.url}/sources/cam2/trigger", headers={"X-API-Key": "line-key"}, timeout=10)
        assert (unknown.status_code, unknown.json()) == (404, {"status": 404, "message": "no source named 'cam2'; "
                                                              "sources: cam", "data": None})
    finally:
        server.stop()
    assert camera.read("TriggerMode", "TriggerSource") == {"TriggerMode": "On", "TriggerSource": "Software"}


@needs_camera
def test_line_trigger_waits_for_the_cameras_trigger_input_and_refuses_http_triggers(tmp_path, camera, peer):
    project, _ = camera_project(tmp_path, peer, trigger="line", trigger_line="Line0", timeout_s=0.5)
    server = start_server(project)
    try:
        time.sleep(1.5)  # three times timeout_s: a free-running camera this quiet would have been opened again
        state = health(server)
        refused = requests.post(f"{server.url}/sources/cam/trigger", timeout=10)
        # A camera that waits for its line sends nothing: that it is gone shows when its heartbeat goes unanswered.
        camera.kill()
        gone = wait_for_health(server, lambda state: not state["connected"])
    finally:
        server.stop()
    assert gone["last_error"] == "CameraError: camera 127.0.0.1: connection lost (it stopped answering)"
    assert (state["connected"], state["acquired"], state["failed"]) == (True, 0, 0)
    assert state["camera"]["trigger_source"] == "Line0"
    assert peer.lines == []
    assert (refused.status_code, refused.json()) == (409, {
        "status": 409, "message": "source cam is in `trigger: line`; set `trigger: software` in project.yaml to "
        "trigger it over HTTP", "data": None})


@needs_camera
def test_a_setting_the_camera_refuses_is_reported_on_health(tmp_path, camera):
    project, _ = camera_project(tmp_path, trigger="line", trigger_line="Line3")
    server = start_server(project)
    try:
        state = wait_for_health(server, lambda state: state["failed"] >= 1)
    finally:
        server.stop()
    assert state["connected"] is False
    assert state["last_error"] == "CameraError: camera 127.0.0.1 has no trigger source Line3; it has Line0, Software"


@needs_camera
def test_a_camera_killed_mid_run_is_reported_and_comes_back_when_restarted(tmp_path, camera, peer):
    project, _ = camera_project(tmp_path, peer, frame_rate=20, timeout_s=0.5)
    server = start_server(project)
    try:
        assert len(peer.wait_for(3)) >= 3
        camera.kill()
        gone = wait_for_health(server, lambda state: not state["connected"])
        assert gone["last_error"] == "CameraError: camera 127.0.0.1: no frame in 0.5 s"
        assert gone["failed"] >= 1
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert re.search(r'appliance_source_frames_total\{outcome="failed",source="cam"\} [1-9]', metrics)
        before = len(peer.lines)

        camera.start()
        back = wait_for_health(server, lambda state: state["connected"] and state["acquired"] > gone["acquired"],
                               seconds=30)
        assert back["connected"] is True and back["last_error"] is None
        assert len(peer.wait_for(before + 3)) >= before + 3
    finally:
        server.stop()


@needs_camera
@needs_tool("mosquitto")
def test_camera_line_as_shipped_publishes_each_frames_verdict_with_the_cameras_frame_id(tmp_path, camera):
    from appliance.training.demo_setup import set_up

    demo = tmp_path / "demo"
    demo.mkdir()
    assert set_up(demo) == 0  # the demo's anomaly model, as `make demo` trains it into projects/demo/models
    config = yaml.safe_load((REPO / "projects" / "camera-line" / "project.yaml").read_text())
    config.update(flow=str(REPO / "flows" / "demo.yaml"), models_dir=str(demo / "models"))
    project = tmp_path / "camera-line"
    project.mkdir()
    (project / "project.yaml").write_text(yaml.safe_dump(config))
    broker = Broker(tmp_path / "broker")
    broker.start()
    subscriber = Subscriber(broker.port, "appliance/#").start()
    server = start_server(project, env={"APPLIANCE_CAMERA": ADDRESS, "APPLIANCE_MQTT_URL": broker.url})
    try:
        heard = subscriber.wait_for(3)
        state = health(server, "line-camera")
    finally:
        server.stop()
        subscriber.stop()
        broker.stop()
    assert len(heard) >= 3 and {message.topic for message in heard} == {"appliance/camera-line/result"}
    assert state["camera"]["device_id"] == SERIAL and (state["camera"]["width"], state["camera"]["height"]) == (
        512, 384)
    frame_ids = []
    for message in heard[:3]:
        payload = message.json()
        data = json.loads(payload["data"])
        assert (payload["source"], data["source"]) == ("line-camera", "line-camera")
        frame_ids.append(int(data["frame_id"]))
        # The fake camera's diagonal ramp is no brick tile: the demo's model calls it a defect.
        assert payload["result"] is False and payload["score"] > payload["threshold"]
        assert payload["labels"] == ["defect"]
    # Two frames are inspected at once (`in_flight: 2`): their verdicts may reach the broker in either order.
    assert len(set(frame_ids)) == 3


def test_check_on_a_pc_without_aravis_names_the_source_and_what_to_install(tmp_path):
    project, _ = camera_project(tmp_path)
    # As on a PC without python3-gi: `import gi` fails (a None in sys.modules blocks an import).
    run = ("import sys; sys.modules['gi'] = None; from appliance.cli import main; "
           "raise SystemExit(main(sys.argv[1:]))")
    for command in (["check", str(project)], ["serve", str(project), "--port", str(free_port())]):
        result = subprocess.run([sys.executable, "-c", run, *command], capture_output=True, text=True, timeout=60,
                                cwd=REPO)
        assert result.returncode == 78, result.stderr
        problem = result.stderr.splitlines()[0]
        assert re.match(r"\S*project\.yaml:\d+:\d+ sources\[0\]: the genicam source needs Aravis 0\.8 through "
                        r"GObject introspection, which is not installed here \(", problem), problem
        assert "gir1.2-aravis-0.8 and python3-gi" in problem and "Traceback" not in result.stderr


def test_settings_that_contradict_each_other_are_located(tmp_path):
    flow = {"nodes": {"v": {"type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}}
    project = write_project(tmp_path / "p", flow, sources=[
        {"type": "genicam", "camera": ADDRESS, "pixel_format": "Mono16"},
        {"type": "genicam", "camera": ADDRESS, "trigger": "software", "frame_rate": 10},
        {"type": "genicam", "camera": ADDRESS, "pixel_format": "BayerRG8", "width": 63, "height": 48},
        {"type": "genicam", "camera": ADDRESS, "buffers": 4},
    ])
    result = subprocess.run([sys.executable, "-m", "appliance", "check", str(project)], capture_output=True,
                            text=True, timeout=60, cwd=REPO)
    assert result.returncode == 78
    problems = [line.split(" ", 1)[1] for line in result.stderr.splitlines()[:-1]]
    assert problems == [
        "sources[0].pixel_format: Input should be 'Mono8', 'BayerRG8' or 'RGB8'",
        "sources[1]: frame_rate is for `trigger: free-run`; with `trigger: software` the camera takes a frame per "
        "trigger",
        "sources[2]: BayerRG8 needs an even width and height (whole 2x2 cells), got 63x48",
        "sources[3]: backlog 3 needs at least 5 buffers, got 4",
    ]
