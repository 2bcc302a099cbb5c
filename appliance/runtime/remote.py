"""The remote backend: a store version inferred on a KServe v2 server (the Open Inference Protocol over HTTP:
OpenVINO Model Server, Triton, KServe's ModelServer, another appliance's `kserve` API), chosen by a firmware
profile with `remote:` (config/profile.py, docs/remote.md).

The store stays on this PC: the spec (labels, thresholds, input) is read here, the nodes pre- and post-process
here, and only the model's input tensor travels. What the remote takes is read from its model metadata at load:
frames as the appliance gives them (u8 BGR NHWC at the spec's size: another appliance), or the network's own
input as spec.yaml describes it (e.g. FP32 NCHW RGB with mean and std: OVMS or Triton serving the IR as it is),
which the appliance then prepares itself. What a remote cannot do it refuses at load with a StoreError: a
reshape, an input that fits neither, a model it does not serve.

Calls go through one connection pool per server (urllib3: thread-safe, keep-alive), each bounded by
`timeout_s`; only a request that was not served (connection refused or failed, 503) is tried again, `retries`
times. A circuit breaker per server opens after `breaker.failures` failed calls in a row: calls then fail at
once, without a request, until `breaker.cool_down_s` has passed and one call is let through to try.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit

import numpy as np
import urllib3
from urllib3.exceptions import ConnectTimeoutError, EmptyPoolError, HTTPError, ProtocolError, ReadTimeoutError

from appliance.config.profile import RemoteSettings, resolve_key
from appliance.errors import NodeError, ServiceUnavailable
from appliance.runtime.compiled import (
    DATATYPES,
    HEADER_LENGTH,
    CompiledModel,
    InputDescription,
    InputShape,
    TensorDescription,
    datatype_of,
    json_header_length,
    shape_text,
)
from appliance.runtime.errors import StoreError
from appliance.runtime.spec import ModelSpec, read_spec
from appliance.runtime.store import network_file

if TYPE_CHECKING:
    from appliance.runtime.models import RuntimeObserver

log = logging.getLogger(__name__)

SPEC_DATATYPES = {"u8": "UINT8", "f32": "FP32"}
# A breaker's state as the appliance_remote_circuit_state gauge shows it.
CLOSED, HALF_OPEN, OPEN = "closed", "half-open", "open"
CIRCUIT_VALUES = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}


class RemoteUnavailable(NodeError, ServiceUnavailable):
    """An inference the remote did not give: the node fails the frame with this message (a NodeError, in the
    answer's `errors`), and an API that calls the model itself answers 503 with it."""


@runtime_checkable
class RemoteObserver(Protocol):
    """What the remote backend reports besides inferences (the server's Metrics implement it)."""

    def follow_remote(self, remote: str, circuit_state: Callable[[], float]) -> None: ...

    def remote_call(self, remote: str, seconds: float) -> None: ...

    def remote_failure(self, remote: str, kind: str) -> None: ...

    def remote_retry(self, remote: str) -> None: ...


class _Failure(Exception):
    """A call that failed: ``kind`` labels the failure metric; ``trips`` says whether the breaker counts it (a
    server that answered 4xx is alive: only our request was wrong)."""

    def __init__(self, kind: str, message: str, trips: bool = True):
        super().__init__(message)
        self.kind, self.message, self.trips = kind, message, trips


class CircuitBreaker:
    """Closed: calls pass. Open (after `failures` failed calls in a row): calls are refused at once. Half-open
    (the cool-down passed): one call passes; its success closes the breaker, its failure opens it again."""

    def __init__(self, failures: int, cool_down_s: float):
        self.threshold, self.cool_down_s = failures, cool_down_s
        self._lock = threading.Lock()
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False  # a half-open call is in flight
        self.last_failure = ""

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if time.monotonic() - self.opened_at >= self.cool_down_s else OPEN

    def state_value(self) -> float:
        return CIRCUIT_VALUES[self.state]

    def admit(self) -> str | None:
        """None when a call may go; else why not (the breaker is open, or a half-open trial is in flight)."""
        with self._lock:
            state = self._state()
            if state == CLOSED:
                return None
            if state == HALF_OPEN and not self.trial:
                self.trial = True
                return None
            assert self.opened_at is not None
            wait = max(0.0, self.opened_at + self.cool_down_s - time.monotonic())
            retry = f"next try in {wait:.1f} s" if state == OPEN else "a trial call is in flight"
            return (f"not called: circuit breaker open after {self.failures} failed calls in a row "
                    f"(last: {self.last_failure}); {retry}")

    def succeeded(self) -> None:
        with self._lock:
            if self.opened_at is not None:
                log.warning("remote circuit closed: a trial call succeeded")
            self.failures, self.opened_at, self.trial = 0, None, False

    def failed(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_failure = reason
            if self.trial or (self.opened_at is None and self.failures >= self.threshold):
                log.warning("remote circuit open for %.1f s after %d failed calls in a row (last: %s)",
                            self.cool_down_s, self.failures, reason)
                self.opened_at = time.monotonic()
            self.trial = False


class Remote:
    """One KServe v2 server: its connection pool and circuit breaker, shared by every model and version that a
    profile with the same settings sends there (a dead server is dead for all of them)."""

    def __init__(self, url: str, settings: RemoteSettings):
        self.url = url
        self.settings = settings
        parts = urlsplit(url)
        # Metrics and logs name the server by host and port only (checked_url refused user, query, fragment).
        self.label = parts.netloc
        self.prefix = parts.path
        self.timeout = urllib3.Timeout(total=settings.timeout_s)
        self.pool = urllib3.connection_from_url(url, maxsize=settings.slots, block=True, retries=False,
                                                timeout=self.timeout)
        self.headers: dict[str, str] = {}
        if settings.api_key is not None:
            key = resolve_key(settings.api_key, Path.cwd(), "remote.api_key").decode("utf-8")
            self.headers["Authorization"] = f"Bearer {key}"
        self.breaker = CircuitBreaker(settings.breaker.failures, settings.breaker.cool_down_s)
        self.observer: RemoteObserver | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
                ) -> urllib3.BaseHTTPResponse:
        """One call with the retries that are safe; returns any HTTP answer (the caller reads its status);
        raises _Failure when none came."""
        attempt, stale_retried = 0, False
        while True:
            try:
                response = self.pool.urlopen(method, self.prefix + path, body=body,
                                             headers={**self.headers, **(headers or {})}, retries=False,
                                             redirect=False, timeout=self.timeout,
                                             # urllib3 annotates int; queue.get takes the float.
                                             pool_timeout=self.settings.timeout_s,  # type: ignore[arg-type]
                                             preload_content=True)
            except ConnectTimeoutError as error:  # NewConnectionError too: refused, unreachable, unknown host
                failure = _Failure("connect", f"cannot connect ({_reason(error)})")
                retry = True
            except ReadTimeoutError:
                failure = _Failure("timeout", f"no answer within {self.settings.timeout_s:g} s (remote.timeout_s)")
                retry = False
            except EmptyPoolError:
                failure = _Failure("busy", f"all {self.settings.slots} connections (remote.slots) stayed busy for "
                                   f"{self.settings.timeout_s:g} s")
                retry = False
            except (ProtocolError, HTTPError, OSError) as error:
                failure = _Failure("disconnected", f"the connection failed during the request ({_reason(error)})")
                # Closed without a byte of answer on a kept-alive connection: the server timed it out while idle
                # (uvicorn, under KServe, after 5 s) as the request left. Tried once more on a new connection;
                # an inference has no side effect, and a server that died refuses the new one.
                retry = not stale_retried and _closed_without_answer(error)
                stale_retried = stale_retried or retry
            else:
                if response.status != 503 or attempt >= self.settings.retries:
                    return response
                failure = _Failure("http_503", f"answered 503 ({_error_text(response)})")
                retry = True
            if not retry or (failure.kind != "disconnected" and attempt >= self.settings.retries):
                raise failure
            if self.observer is not None:
                self.observer.remote_retry(self.label)
            if failure.kind != "disconnected":  # the stale connection's one retry is at once, and extra
                attempt += 1
                time.sleep(self.settings.retry_backoff_s * 2 ** (attempt - 1))

    def get_json(self, path: str, what: str) -> tuple[int, Any]:
        """A GET whose answer is JSON (or an error text); raises _Failure when the server did not answer."""
        response = self.request("GET", path)
        try:
            return response.status, json.loads(response.data) if response.data else None
        except ValueError:
            if response.status == 200:
                raise _Failure("answer", f"{what}: the answer is not JSON") from None
            return response.status, response.data[:200].decode("utf-8", "replace")


_REMOTES: dict[tuple[str, str], Remote] = {}
_REMOTES_LOCK = threading.Lock()


def remote_for(url: str, settings: RemoteSettings) -> Remote:
    """The one Remote of this URL and these settings in the process (every slot, version and reload shares it)."""
    key = (url, settings.model_dump_json())
    with _REMOTES_LOCK:
        if key not in _REMOTES:
            _REMOTES[key] = Remote(url, settings)
        return _REMOTES[key]


def _reason(error: BaseException) -> str:
    """The last, human part of urllib3's messages ("...: Failed to establish a new connection: [Errno 111]
    Connection refused" -> "connection refused")."""
    text = str(error.args[-1] if error.args else error)
    for known, said in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                        ("No route to host", "no route to host"), ("timed out", "timed out"),
                        ("Connection reset", "connection reset"), ("Broken pipe", "connection reset"),
                        ("RemoteDisconnected", "closed by the server"),
                        ("closed connection", "closed by the server")):
        if known in text or known in repr(error):
            return said
    return text.split(": ")[-1][:200] or type(error).__name__


def _closed_without_answer(error: BaseException) -> bool:
    return any(isinstance(part, http.client.RemoteDisconnected) for part in (error, *error.args))


def _error_text(response: urllib3.BaseHTTPResponse) -> str:
    """The message of an error answer: KServe's and the appliance's `{"error": ...}`, FastAPI's `detail`,
    else the start of the body."""
    try:
        body = json.loads(response.data)
    except ValueError:
        return response.data[:200].decode("utf-8", "replace").strip() or f"HTTP {response.status}"
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if key in body:
                return str(body[key])[:300]
    return json.dumps(body)[:200]


def _fits(shape: list[int], wanted: tuple[int, ...]) -> bool:
    """Whether a remote shape (-1: any size) takes a tensor of shape ``wanted``."""
    return len(shape) == len(wanted) and all(have in (-1, want) for have, want in zip(shape, wanted, strict=True))


def network_tensor(batch: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """u8 BGR NHWC frames as the network itself takes them (spec.yaml's input): colour order, then for f32
    (pixel * scale - mean) / std per channel, then the layout. The same steps the OpenVINO backend puts in the
    graph (runtime/openvino.py), done here for a remote that serves the network as it is."""
    wanted = spec.input
    tensor = batch[..., ::-1] if wanted.colour_order == "RGB" else batch
    if wanted.element_type == "f32":
        tensor = tensor.astype(np.float32)
        if wanted.scale != 1.0:
            tensor *= np.float32(wanted.scale)
        if wanted.mean is not None:
            tensor -= np.asarray(wanted.mean, np.float32)
        if wanted.std is not None:
            tensor /= np.asarray(wanted.std, np.float32)
    if wanted.layout == "NCHW":
        tensor = tensor.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(tensor)


def encode_request(input_name: str, tensor: np.ndarray, binary: bool) -> tuple[bytes, dict[str, str]]:
    """An inference request's body and headers: the binary tensor extension (a JSON header, then the tensor's
    bytes, little-endian) asking for binary outputs, or plain JSON."""
    entry: dict[str, Any] = {"name": input_name, "shape": list(tensor.shape), "datatype": datatype_of(tensor.dtype)}
    if not binary:
        entry["data"] = tensor.ravel().tolist()
        return json.dumps({"inputs": [entry]}).encode("utf-8"), {"Content-Type": "application/json"}
    data = np.ascontiguousarray(tensor, dtype=tensor.dtype.newbyteorder("<")).tobytes()
    entry["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps({"inputs": [entry], "parameters": {"binary_data_output": True}}).encode("utf-8")
    return header + data, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def decode_response(body: bytes, header_length: str | None) -> list[tuple[str, np.ndarray]]:
    """The outputs of an inference answer, in its order, as writable arrays the caller owns; ValueError saying
    what is wrong with an answer that is not the protocol's."""
    size = json_header_length(header_length, len(body))
    answer = json.loads(body[:size] if size is not None else body)
    outputs = answer.get("outputs") if isinstance(answer, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise ValueError("the answer has no outputs")
    offset = size or 0
    found = []
    for entry in outputs:
        if not isinstance(entry, dict) or entry.get("datatype") not in DATATYPES:
            raise ValueError(f"output {json.dumps(entry)[:100]} has no datatype of numbers")
        dtype, shape = DATATYPES[entry["datatype"]], tuple(entry.get("shape") or ())
        count = int(np.prod(shape))
        binary_size = (entry.get("parameters") or {}).get("binary_data_size")
        if binary_size is not None:
            if binary_size != count * dtype.itemsize or offset + binary_size > len(body):
                raise ValueError(f"output '{entry.get('name')}': binary_data_size {binary_size} does not fit shape "
                                 f"{shape_text(shape)} of {entry['datatype']} or the answer's length")
            array = np.frombuffer(body, dtype.newbyteorder("<"), count, offset).astype(dtype).reshape(shape)
            offset += binary_size
        else:
            data = entry.get("data")
            if not isinstance(data, list):
                raise ValueError(f"output '{entry.get('name')}' has neither data nor binary_data_size")
            array = np.asarray(data, dtype).reshape(shape)
        found.append((str(entry.get("name")), array))
    return found


class RemoteModel(CompiledModel):
    """One store version served by a KServe v2 server; `infer` is a blocking HTTP call from a worker thread."""

    def __init__(self, name: str, version_dir: Path, remote: RemoteSettings, observer: RuntimeObserver | None = None,
                 input_shape: InputShape | None = None):
        started = time.perf_counter()
        self.observer = None  # the warm-up inference is not a served one
        self.name = name
        self.version = version_dir.name
        self.spec = read_spec(version_dir)
        try:
            url = remote.resolved_url()
        except ValueError as error:
            raise StoreError(f"model '{name}': the firmware profile's {error}") from None
        self.remote = remote_for(url, remote)
        self.remote_name = remote.remote_name(name)
        self.device = f"kserve {url}"
        self.execution_devices = [url]
        self.precision = "remote"
        self.slots = remote.slots
        height, width = self.spec.input.size
        where = f"model '{name}' (remote '{self.remote_name}' at {url})"
        if input_shape is not None and tuple(input_shape) != (1, height, width):
            raise StoreError(f"{where}: a remote model cannot be reshaped to {shape_text(input_shape)} (batch, "
                             f"height, width); it runs at the size it is served with, the spec's 1 x {height} x "
                             f"{width}. Use a local firmware profile (cpu, igpu, npu) for this node")
        self.input = InputDescription((1, height, width, 3), any_size=False, name=self.spec.input.name or "input")
        path = f"/v2/models/{quote(self.remote_name, safe='')}"
        if remote.send_version:
            path += f"/versions/{quote(self.version, safe='')}"
        self._infer_path = path + "/infer"
        try:
            metadata = self._metadata(url, path, where)
            self._input_name, self._takes_frames = self._choose_input(metadata, url, where)
            self.outputs, self._mapping = self._learn_outputs(version_dir, metadata, where)
        except _Failure as failure:
            raise StoreError(f"{where}: {failure.message}") from None
        self.load_seconds = time.perf_counter() - started
        self.observer = observer
        if isinstance(observer, RemoteObserver):
            self.remote.observer = observer
            observer.follow_remote(self.remote.label, self.remote.breaker.state_value)
        log.info("model %s version %s: served by %s as '%s', taking %s", name, self.version, url, self.remote_name,
                 "frames (u8 BGR NHWC)" if self._takes_frames else "the network's input (prepared here)")

    # --- load -------------------------------------------------------------------------------------------------

    def _metadata(self, url: str, path: str, where: str) -> dict[str, Any]:
        status, ready = self.remote.get_json("/v2/health/ready", "readiness")
        if status != 200:
            raise _Failure("status", f"the server at {url} is not ready (/v2/health/ready answered {status}: "
                           f"{_text(ready)})")
        status, metadata = self.remote.get_json(path, "model metadata")
        if status == 404:
            raise _Failure("status", f"not found at {url} (GET {path} answered 404: {_text(metadata)}); serve it "
                           "there under that name, or map the store name in the profile's remote.models")
        if status != 200 or not isinstance(metadata, dict):
            raise _Failure("status", f"GET {path} answered {status}: {_text(metadata)}")
        return metadata

    def _choose_input(self, metadata: dict[str, Any], url: str, where: str) -> tuple[str, bool]:
        """The input's name, and whether the remote takes frames (else the network's own input)."""
        spec = self.spec.input
        height, width = spec.size
        frames = (1, height, width, 3)
        network = (1, height, width, 3) if spec.layout == "NHWC" else (1, 3, height, width)
        network_type = SPEC_DATATYPES[spec.element_type]
        inputs = metadata.get("inputs") or []
        wanted = self.remote.settings.input
        if not inputs:
            # KServe's custom models describe no input: the same network served as it is.
            if wanted == "auto":
                log.info("%s: the remote describes no input; sending the network's input as spec.yaml says", where)
            return spec.name or "input", wanted == "frames"
        if len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise _Failure("metadata", f"takes {len(inputs)} inputs; the appliance sends one tensor")
        given = inputs[0]
        shape, datatype = list(given.get("shape") or []), given.get("datatype")
        takes_frames = datatype == "UINT8" and _fits(shape, frames)
        takes_network = datatype == network_type and _fits(shape, network)
        expected = {"frames": f"UINT8 {shape_text(frames)} (u8 BGR frames, NHWC)",
                    "network": f"{network_type} {shape_text(network)} (the network's input per spec.yaml: "
                               f"{spec.element_type} {spec.layout} {spec.colour_order})"}
        if wanted != "auto" and not (takes_frames if wanted == "frames" else takes_network):
            raise _Failure("metadata", f"takes {datatype} {shape_text(shape)}; remote.input: {wanted} sends "
                           f"{expected[wanted]}")
        if wanted == "auto":
            if not (takes_frames or takes_network):
                raise _Failure("metadata", f"takes {datatype} {shape_text(shape)}; the appliance sends "
                               f"{expected['frames']} or {expected['network']}")
            if takes_frames and takes_network and spec.colour_order != "BGR":
                # A u8 NHWC RGB network looks like frames: another appliance takes frames, any other server the
                # network's input.
                takes_frames = self._is_appliance()
            wanted = "frames" if takes_frames else "network"
        return str(given.get("name") or spec.name or "input"), wanted == "frames"

    def _is_appliance(self) -> bool:
        try:
            status, server = self.remote.get_json("/v2", "server metadata")
        except _Failure:
            return False
        return status == 200 and isinstance(server, dict) and server.get("name") == "appliance"

    def _learn_outputs(self, version_dir: Path, metadata: dict[str, Any], where: str
                       ) -> tuple[list[TensorDescription], dict[str, str]]:
        """The outputs under the names the network has here (the nodes read them by those names), from a
        warm-up inference; a remote that names them otherwise (KServe's `output-0`) is mapped by position."""
        from appliance.runtime.devices import core

        local = [port.get_any_name() for port in core().read_model(str(network_file(version_dir))).outputs]
        height, width = self.input.size
        answer = self._call(np.zeros((1, height, width, 3), np.uint8))
        names = [name for name, _ in answer]
        if set(local) <= set(names):
            mapping = {name: name for name in local}
        elif len(names) == len(local):
            mapping = dict(zip(names, local, strict=True))
            log.info("%s: the remote's outputs %s are the network's %s, by position", where, names, local)
        else:
            raise _Failure("metadata", f"answers outputs {', '.join(names)}; the network has {', '.join(local)}")
        declared = {entry.get("name"): entry for entry in metadata.get("outputs") or [] if isinstance(entry, dict)}
        outputs = []
        for name, array in answer:
            if name in mapping:
                shape = declared.get(name, {}).get("shape") or list(array.shape)
                # decode_response made it from one of the protocol's datatypes
                datatype = datatype_of(array.dtype)
                assert datatype is not None
                outputs.append(TensorDescription(mapping[name], datatype, tuple(shape)))
        return outputs, mapping

    # --- inference --------------------------------------------------------------------------------------------

    def _call(self, batch: np.ndarray) -> list[tuple[str, np.ndarray]]:
        tensor = batch if self._takes_frames else network_tensor(batch, self.spec)
        body, headers = encode_request(self._input_name, tensor, self.remote.settings.binary_tensors)
        response = self.remote.request("POST", self._infer_path, body, headers)
        if response.status != 200:
            raise _Failure(f"http_{response.status // 100}xx", f"answered {response.status} ({_error_text(response)})",
                           trips=response.status >= 500)
        try:
            return decode_response(response.data, response.headers.get(HEADER_LENGTH))
        except ValueError as error:
            raise _Failure("answer", f"the answer is not a KServe v2 inference response ({error})") from None

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        height, width = self.input.size
        if batch.dtype != np.uint8 or batch.shape != (1, height, width, 3):
            raise RemoteUnavailable(f"model '{self.name}': a remote model takes one u8 BGR frame of {width}x{height} "
                                    f"(1 x {height} x {width} x 3), got {batch.dtype} {shape_text(batch.shape)}")
        remote = self.remote
        refused = remote.breaker.admit()
        if refused is not None:
            if remote.observer is not None:
                remote.observer.remote_failure(remote.label, "circuit_open")
            raise RemoteUnavailable(f"model '{self.name}' on {remote.url}: {refused}")
        started = time.perf_counter()
        try:
            answer = self._call(batch)
        except _Failure as failure:
            if failure.trips:
                remote.breaker.failed(failure.message)
            else:
                remote.breaker.succeeded()  # the server answered: it is alive
            if remote.observer is not None:
                remote.observer.remote_failure(remote.label, failure.kind)
            raise RemoteUnavailable(f"model '{self.name}' on {remote.url}: {failure.message}") from None
        except BaseException:
            remote.breaker.failed("an unexpected error")
            raise
        remote.breaker.succeeded()
        seconds = time.perf_counter() - started
        if remote.observer is not None:
            remote.observer.remote_call(remote.label, seconds)
        if self.observer is not None:
            self.observer.inference(self, seconds)
        return {self._mapping[name]: array for name, array in answer if name in self._mapping}

    def health(self) -> dict[str, object]:
        """For /health: the server, and its breaker."""
        breaker = self.remote.breaker
        return {"url": self.remote.url, "circuit": breaker.state, "failed_calls_in_a_row": breaker.failures}

    def metadata(self) -> dict[str, object]:
        return {**super().metadata(), "remote": self.health(), "remote_name": self.remote_name}


def _text(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("error", "detail", "message"):
            if key in value:
                return str(value[key])[:300]
    return (value if isinstance(value, str) else json.dumps(value))[:200]
