"""genicam: a GigE Vision or USB3 Vision camera through Aravis (GObject introspection): pixel format, region,
exposure and gain written to the camera; free-run at a rate, a software trigger over HTTP, or the camera's own
trigger line. Frames are popped from Aravis's stream in the source's thread, with the camera's frame id and clock.

Aravis is imported on first use, so the appliance runs without it; a project with a genicam source on a PC
without it fails `appliance check` and `serve` with the place of the source and what to install.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from appliance.errors import ApplianceError, ServiceUnavailable
from appliance.outputs.base import EnvValue, resolved
from appliance.sources.base import Acquired, Source, SourceSettings

PixelFormat = Literal["Mono8", "BayerRG8", "RGB8"]
TriggerMode = Literal["free-run", "software", "line"]
INSTALL_HINT = ("install Debian's gir1.2-aravis-0.8 and python3-gi (`make test-tools` does), or PyGObject in the "
                "appliance's venv (`pip install 'appliance[camera]'`, which builds against libgirepository1.0-dev "
                "and libcairo2-dev); docs/sources.md")
# Where a distribution's python3-gi lives (Debian and Ubuntu; Fedora and Arch). Only a `gi` built for this very
# Python is found there: the import system takes an extension module only with this interpreter's ABI suffix
# (e.g. .cpython-311-x86_64-linux-gnu.so), so a venv on another Python version gets a clear ImportError instead.
SYSTEM_SITE_DIRS = ("/usr/lib/python3/dist-packages",
                    f"/usr/lib64/python3.{sys.version_info[1]}/site-packages",
                    f"/usr/lib/python3.{sys.version_info[1]}/site-packages")
# How long one pop waits: the longest a stop or a lost camera goes unnoticed while no frame comes.
POP_WAIT_US = 200_000
# While a frame waits for room: how often the frames queued behind it are counted (room itself wakes the wait at
# once). Only while the inspection is behind; a sixth of a frame period at 30 frames/s.
BACKLOG_POLL_S = 0.005

_aravis: ModuleType | None = None
_aravis_lock = threading.Lock()


class CameraError(OSError):
    """The camera is absent, refused a setting, or stopped answering; the source opens it again after a backoff."""


def _import_gi() -> ModuleType:
    """PyGObject's `gi`: the venv's own (`appliance[camera]`), else the distribution's python3-gi when it was
    built for this Python (the appliance's venv on Debian bookworm is Python 3.11, as its python3-gi is). Only
    the `gi` package is taken from there, not the rest of the distribution's site-packages."""
    if "gi" in sys.modules and sys.modules["gi"] is None:
        raise ImportError("import of gi is blocked (sys.modules['gi'] is None)")
    try:
        import gi

        return gi
    except ImportError as error:
        missing = error
    for folder in SYSTEM_SITE_DIRS:
        spec = importlib.machinery.PathFinder.find_spec("gi", [folder])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules["gi"] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as error:  # e.g. its _gi extension was built for another Python
            del sys.modules["gi"]
            missing = error
            continue
        return module
    raise missing


def load_aravis() -> ModuleType:
    """`gi.repository.Aravis` 0.8; ImportError saying what to install when it is not there."""
    global _aravis
    with _aravis_lock:
        if _aravis is None:
            try:
                gi = _import_gi()
                gi.require_version("Aravis", "0.8")
                from gi.repository import Aravis  # type: ignore[import-not-found]
            except (ImportError, ValueError) as error:  # ValueError: gi is there, Aravis's typelib is not
                raise ImportError(f"the genicam source needs Aravis 0.8 through GObject introspection, which "
                                  f"is not installed here ({error}); {INSTALL_HINT}") from None
            _aravis = Aravis
        return _aravis


def _message(error: Exception) -> str:
    """A GLib.Error's own message (its str() prefixes the error domain and appends the code)."""
    return str(getattr(error, "message", None) or error)


class GenicamSettings(SourceSettings):
    type: Literal["genicam"]
    camera: str | EnvValue | None = Field(None, description="the camera's id as `arv-tool-0.8` lists it (e.g. "
                                          "Basler-acA1920-40gc-21234567), its serial number or its IP address; "
                                          "default: the first camera found")
    pixel_format: PixelFormat = Field("Mono8", description="Mono8 (gray), BayerRG8 (demosaiced to colour here) "
                                      "or RGB8")
    width: int | None = Field(None, ge=1, le=65535, description="the region read from the sensor; default: the "
                              "camera's current region")
    height: int | None = Field(None, ge=1, le=65535)
    offset_x: int = Field(0, ge=0, le=65535, description="with width and height: the region's top-left corner")
    offset_y: int = Field(0, ge=0, le=65535)
    exposure_us: float | None = Field(None, gt=0, description="exposure time in microseconds (automatic exposure "
                                      "is switched off); default: the camera's")
    gain: float | None = Field(None, ge=0, description="in the camera's own gain unit (dB on most); automatic "
                               "gain is switched off; default: the camera's")
    trigger: TriggerMode = Field("free-run", description="free-run: frames at `frame_rate`; software: one frame "
                                 "per POST /sources/{name}/trigger; line: one frame per pulse on `trigger_line`")
    frame_rate: float | None = Field(None, gt=0, le=10000, description="free-run: frames per second asked of "
                                     "the camera (clamped to what it can); default: the camera's")
    trigger_line: str = Field("Line0", pattern=r"^[A-Za-z0-9_]+$", description="trigger: line: the camera's "
                              "trigger input, one of its TriggerSource entries (Line0, Line1...)")
    # 10: the waiting frame and the `backlog` behind it hold 4 at most, which leaves Aravis 6 to receive into
    # while the source's thread waits for the CPU (8 left 4, and a loaded 2-core PC lost frames as underruns).
    buffers: int = Field(10, ge=2, le=256, description="frame buffers queued in Aravis's stream; a frame that "
                         "arrives when all are taken is lost at the host (counted as `underruns`)")
    backlog: int = Field(3, ge=0, le=254, description="while the source's `in_flight` frames are all being "
                         "inspected, the next frame waits in the camera's buffer until one is done, and is dropped "
                         "only when this many newer frames wait behind it (0: dropped at once); at most `buffers` "
                         "- 2, and so many frame periods of latency more when the inspection falls behind")
    packet_size: int | None = Field(None, ge=576, le=16384, description="GigE Vision: bytes per stream packet; "
                                    "8192 or 9000 with jumbo frames on the camera's network, for a fraction of the "
                                    "packets (and of the CPU both ends spend on them); default: Aravis's choice")
    timeout_s: float = Field(2.0, gt=0, le=600, description="free-run: no frame for this long (and for 3 frame "
                             "periods) means the camera is gone; it is opened again")

    @model_validator(mode="after")
    def _consistent(self) -> GenicamSettings:
        if self.trigger != "free-run" and self.frame_rate is not None:
            raise ValueError(f"frame_rate is for `trigger: free-run`; with `trigger: {self.trigger}` the camera "
                             "takes a frame per trigger")
        if self.trigger != "line" and "trigger_line" in self.model_fields_set:
            raise ValueError(f"trigger_line is for `trigger: line`, not `trigger: {self.trigger}`")
        if self.backlog > self.buffers - 2:
            # The frame that waits and those behind it hold buffers; Aravis needs one more to receive into.
            raise ValueError(f"backlog {self.backlog} needs at least {self.backlog + 2} buffers, got {self.buffers}")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height (the region read from the sensor), or neither")
        if self.width is None and (self.offset_x or self.offset_y):
            raise ValueError("offset_x and offset_y need width and height")
        if self.pixel_format == "BayerRG8" and self.width is not None and self.height is not None and (
                self.width % 2 or self.height % 2):
            raise ValueError(f"BayerRG8 needs an even width and height (whole 2x2 cells), got "
                             f"{self.width}x{self.height}")
        # The place of this source is the place to say that this PC cannot run it (check and serve refuse it).
        try:
            load_aravis()
        except ImportError as error:
            raise ValueError(str(error)) from None
        return self


class GenicamSource(Source[GenicamSettings]):
    settings_model = GenicamSettings

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.camera: Any = None
        self.stream: Any = None
        # The camera is used by the source's thread and by triggers from the server's threads; close() replaces it.
        self._camera_lock = threading.Lock()
        self._lost = threading.Event()
        self._trigger_failure: str | None = None
        self.triggers = 0
        self.incomplete = 0
        self.underruns = 0
        # What the camera reports after it was set up (values as it rounded or clamped them), for /health.
        self.camera_state: dict[str, Any] = {}

    @property
    def camera_name(self) -> str:
        return resolved(self.settings.camera) if self.settings.camera is not None else "(first found)"

    # --- opening: the settings written to the camera, then read back --------------------------------------

    def open(self) -> None:
        Aravis = load_aravis()
        settings = self.settings
        self._lost.clear()
        self._trigger_failure = None
        name = resolved(settings.camera) if settings.camera is not None else None
        try:
            camera = Aravis.Camera.new(name)
        except Exception as error:  # noqa: BLE001 - GLib.Error: not found, not reachable
            raise CameraError(f"camera {self.camera_name}: {_message(error)}") from None
        with self._camera_lock:
            self.camera = camera
        device = camera.get_device()
        # GigE Vision: the heartbeat went unanswered; USB3: unplugged. Emitted from Aravis's own thread.
        device.connect("control-lost", lambda _device: self._lost.set())
        try:
            self._configure(Aravis, camera)
            camera.set_acquisition_mode(Aravis.AcquisitionMode.CONTINUOUS)
            stream = camera.create_stream(None, None)
            payload = camera.get_payload()
            for _ in range(settings.buffers):
                stream.push_buffer(Aravis.Buffer.new_allocate(payload))
            self.stream = stream
            self.camera_state = self._read_back(camera)
            camera.start_acquisition()
        except CameraError:
            raise
        except Exception as error:  # noqa: BLE001 - GLib.Error from a feature the camera refused
            raise CameraError(f"camera {self.camera_name}: {_message(error)}") from None

    def _configure(self, Aravis: ModuleType, camera: Any) -> None:
        settings = self.settings
        offered = list(camera.dup_available_pixel_formats_as_strings() or [])
        if settings.pixel_format not in offered:
            raise CameraError(f"camera {self.camera_name} does not offer pixel format {settings.pixel_format}; it "
                              f"offers {', '.join(offered)}")
        camera.set_pixel_format_from_string(settings.pixel_format)
        if settings.width is not None and settings.height is not None:
            _, widest = camera.get_width_bounds()
            _, highest = camera.get_height_bounds()
            if settings.offset_x + settings.width > widest or settings.offset_y + settings.height > highest:
                raise CameraError(f"camera {self.camera_name}: region {settings.width}x{settings.height} at "
                                  f"({settings.offset_x}, {settings.offset_y}) exceeds its {widest}x{highest}")
            camera.set_region(settings.offset_x, settings.offset_y, settings.width, settings.height)
        if settings.exposure_us is not None:
            if camera.is_exposure_auto_available():
                camera.set_exposure_time_auto(Aravis.Auto.OFF)
            low, high = camera.get_exposure_time_bounds()
            if not low <= settings.exposure_us <= high:
                raise CameraError(f"camera {self.camera_name}: exposure_us {settings.exposure_us:g} is outside its "
                                  f"range {low:g}-{high:g} us")
            camera.set_exposure_time(settings.exposure_us)
        if settings.gain is not None:
            if camera.is_gain_auto_available():
                camera.set_gain_auto(Aravis.Auto.OFF)
            low, high = camera.get_gain_bounds()
            if not low <= settings.gain <= high:
                raise CameraError(f"camera {self.camera_name}: gain {settings.gain:g} is outside its range "
                                  f"{low:g}-{high:g}")
            camera.set_gain(settings.gain)
        if settings.packet_size is not None:
            if not camera.is_gv_device():
                raise CameraError(f"camera {self.camera_name} is not a GigE Vision camera: packet_size does not "
                                  "apply")
            # Aravis checks it when the stream is created and lowers it if such packets do not get through.
            camera.gv_set_packet_size(settings.packet_size)
        if settings.trigger == "free-run":
            # A camera keeps its trigger settings across sessions: free-run must clear them explicitly (setting a
            # frame rate does too, in Aravis).
            if settings.frame_rate is not None:
                camera.set_frame_rate(settings.frame_rate)
            else:
                camera.clear_triggers()
        else:
            source = "Software" if settings.trigger == "software" else settings.trigger_line
            available = list(camera.dup_available_trigger_sources() or [])
            if source not in available:
                raise CameraError(f"camera {self.camera_name} has no trigger source {source}; it has "
                                  f"{', '.join(available) or 'none'}")
            camera.set_trigger(source)

    def _read_back(self, camera: Any) -> dict[str, Any]:
        """The camera's own values after the settings were written: cameras round and clamp what they are given."""

        def read(getter: str) -> Any:
            try:
                return getattr(camera, getter)()
            except Exception:  # noqa: BLE001 - a feature this camera does not have
                return None

        x, y, width, height = read("get_region") or (None, None, None, None)
        state = {"device_id": read("get_device_id"), "vendor": read("get_vendor_name"),
                 "model": read("get_model_name"), "pixel_format": read("get_pixel_format_as_string"),
                 "width": width, "height": height, "offset_x": x, "offset_y": y,
                 "exposure_us": read("get_exposure_time"), "gain": read("get_gain")}
        if camera.is_gv_device():
            state["packet_size"] = read("gv_get_packet_size")
        if self.settings.trigger == "free-run":
            state["frame_rate"] = read("get_frame_rate")
        else:
            state["trigger_source"] = read("get_trigger_source")
        return state

    # --- acquiring -----------------------------------------------------------------------------------------

    def frames(self) -> Iterator[Acquired]:
        Aravis = load_aravis()
        stream = self.stream
        assert stream is not None
        silence_s = self.settings.timeout_s
        rate = self.camera_state.get("frame_rate")
        if isinstance(rate, float) and rate > 0:
            silence_s = max(silence_s, 3 / rate)
        last_frame = time.monotonic()
        while not self.stopping:
            if self._lost.is_set():
                raise CameraError(f"camera {self.camera_name}: connection lost (it stopped answering)")
            if self._trigger_failure is not None:
                raise CameraError(f"camera {self.camera_name}: {self._trigger_failure}")
            buffer = stream.timeout_pop_buffer(POP_WAIT_US)  # PyGObject releases the GIL while Aravis waits
            # Aravis's own count of frames that found every buffer taken.
            self.underruns = Aravis.Stream.get_statistics(stream)[2]
            if buffer is None:
                if self.settings.trigger == "free-run" and time.monotonic() - last_frame > silence_s:
                    raise CameraError(f"camera {self.camera_name}: no frame in {silence_s:g} s")
                continue
            try:
                frame = self._frame(Aravis, buffer, stream)
            finally:
                stream.push_buffer(buffer)
            if frame is not None:
                last_frame = time.monotonic()
                yield frame

    def _frame(self, Aravis: ModuleType, buffer: Any, stream: Any) -> Acquired | None:
        """The buffer's pixels as a BGR or gray image (copied: the buffer goes back to the stream at once), or no
        image when the pipeline has no room for the frame within the backlog (it is dropped: not worth a copy)."""
        status = buffer.get_status()
        frame_id = buffer.get_frame_id()
        if status != Aravis.BufferStatus.SUCCESS:
            self._incomplete(frame_id, status.value_nick)
            return None
        # timestamp: the host's clock when the frame was complete (comparable with every other time here); the
        # camera's own clock counts from its power-up unless it is synchronised (PTP).
        timestamp, camera_ns = buffer.get_system_timestamp() / 1e9, buffer.get_timestamp()
        if not self._room_within_backlog(stream):
            return Acquired(None, str(frame_id), timestamp, extra={"camera_timestamp_ns": camera_ns})
        width, height = buffer.get_image_width(), buffer.get_image_height()
        # PyGObject returns the buffer's bytes as a copy of their own (0.34 ms for 1080p Mono8).
        data = buffer.get_data()
        pixel_format = self.settings.pixel_format
        needed = width * height * (3 if pixel_format == "RGB8" else 1)
        if len(data) < needed:
            self._incomplete(frame_id, f"{len(data)} bytes for {width}x{height} {pixel_format}")
            return None
        # Here, not at the top: validating a project's configuration imports no OpenCV (tests/test_config.py).
        import cv2

        from appliance import frames

        pixels = np.frombuffer(data, np.uint8, needed)
        image: np.ndarray
        if pixel_format == "Mono8":
            # A read-only view of that copy, not a second one: nodes replace the image rather than write into it,
            # and a Code hook gets its own copy (nodes/code.py).
            image = pixels.reshape(height, width)
        elif pixel_format == "BayerRG8":
            image = frames.demosaic_rggb(pixels.reshape(height, width))
        else:
            image = cv2.cvtColor(pixels.reshape(height, width, 3), cv2.COLOR_RGB2BGR)
        return Acquired(image, str(frame_id), timestamp, extra={"camera_timestamp_ns": camera_ns})

    def _room_within_backlog(self, stream: Any) -> bool:
        """Whether the popped frame gets inspected: at once when the pipeline has room; else once it has, as long
        as fewer than `backlog` newer frames wait behind it in the stream (then it is the one dropped: the
        newer frames are inspected, and a camera's latency stays bounded when the inspection falls behind)."""
        while not self.wait_for_room(BACKLOG_POLL_S if self.settings.backlog else 0):
            if self.stopping or self._lost.is_set() or stream.get_n_buffers()[1] >= self.settings.backlog:
                return False
        return True

    def _incomplete(self, frame_id: int, reason: str) -> None:
        """A frame that arrived with packets missing (or short): counted as failed, the camera stays open."""
        self.incomplete += 1
        self.failed += 1
        self.last_error = f"frame {frame_id} incomplete: {reason}"
        self.count("failed")  # a Prometheus counter: safe from this thread

    # --- the software trigger, closing, health ------------------------------------------------------------

    def trigger(self) -> int:
        if self.settings.trigger != "software":
            raise ApplianceError(f"source {self.name} is in `trigger: {self.settings.trigger}`; set `trigger: "
                                 "software` in project.yaml to trigger it over HTTP", status=409)
        with self._camera_lock:
            camera = self.camera
            if camera is None or not self.connected:
                raise ServiceUnavailable(f"source {self.name}: camera {self.camera_name} is not connected "
                                         f"({self.last_error or 'opening'}); no trigger sent")
            try:
                camera.software_trigger()
            except Exception as error:  # noqa: BLE001 - GLib.Error: the camera did not take the command
                # The acquisition thread opens the camera again; this trigger is lost, and the caller told so.
                self._trigger_failure = f"software trigger failed: {_message(error)}"
                raise ServiceUnavailable(f"source {self.name}: {self._trigger_failure}") from None
            self.triggers += 1
            return self.triggers

    def close(self) -> None:
        with self._camera_lock:
            camera, self.camera = self.camera, None
            stream, self.stream = self.stream, None
        if camera is not None and not self._lost.is_set():
            try:
                camera.stop_acquisition()
            except Exception:  # noqa: BLE001 - the camera may be gone; closing never raises
                pass
        # Dropping the last references finalises the stream (its receiving thread ends) and the device (control
        # released), in this thread.
        del stream, camera

    def health(self) -> dict[str, Any]:
        answer = super().health()
        answer["trigger"] = self.settings.trigger
        if self.settings.trigger == "software":
            answer["triggers"] = self.triggers
        answer["incomplete"] = self.incomplete
        answer["underruns"] = self.underruns
        answer["camera"] = self.camera_state
        return answer
