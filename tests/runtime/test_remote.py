"""The remote backend (runtime/remote.py, the `kserve` firmware profile) against real KServe v2 servers on loopback:
KServe's own `ModelServer` (kserve==0.21.0 in its own venv, made by bench/kserve.py; tests that need it are skipped,
saying why, only when pip cannot install it) serving the store's networks through OpenVINO, and another appliance's
`kserve` API serving projects/classify-objects.

Faults (a server that dies, resets connections, hangs, answers 503) are put between the appliance and the real
peer by a TCP relay in this file: what the peer receives is counted on the peer itself (its /metrics).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import yaml
from skimage import data

from appliance.config.profile import FirmwareProfile, RemoteSettings, load_profile
from appliance.errors import ConfigError
from appliance.frames import Frame
from appliance.project import Project
from appliance.runtime.models import RuntimeOptions
from appliance.runtime.openvino import OpenVinoModel
from appliance.runtime.remote import RemoteModel, RemoteUnavailable
from appliance.runtime.store import StoreError, resolve_version
from appliance.telemetry.metrics import Metrics
from bench.kserve import DEFAULT_VENV, KSERVE, peer_python, wait_ready
from tests.conftest import REPO, Server, free_port, start_server, write_project

MODEL = "efficientnet_lite0"
STORE = REPO / "models"
FLOW = REPO / "flows" / "classify_objects.yaml"
CPU_F32 = RuntimeOptions("CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})

# The peer: bench/kserve_peer.py's OpenVINO model as an integrator writes it for KServe (no metadata: KServe's
# custom models describe no input, and name their output `output-0`), and the same served with its input and
# outputs described in model metadata, as OVMS and Triton describe an IR.
PEER = """
import json, sys
sys.path.insert(0, {repo!r})
import openvino as ov
from kserve import ModelServer
from bench.kserve_peer import OpenVinoClassifier

TYPES = {{"u8": "UINT8", "f32": "FP32", "i64": "INT64"}}

def described(port):
    shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
    return {{"name": port.get_any_name(), "datatype": TYPES[port.get_element_type().get_type_name()], "shape": shape}}

class Described(OpenVinoClassifier):
    def get_input_types(self):
        return [described(port) for port in ov.Core().read_model(self.network).inputs]

    def get_output_types(self):
        return [described(port) for port in ov.Core().read_model(self.network).outputs]

port, models = int(sys.argv[1]), json.loads(sys.argv[2])
served = [(Described if model["described"] else OpenVinoClassifier)(model["name"], model["network"],
          {{"INFERENCE_PRECISION_HINT": "f32"}}) for model in models]
ModelServer(http_port=port, workers=1, enable_grpc=False, enable_latency_logging=False).start(served)
"""


def coffee(size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """scikit-image's coffee, centre-cropped and resized as classify@1 gives it to the model: 1 x H x W x 3 BGR."""
    image = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return cv2.resize(image[top:top + side, left:left + side], size[::-1], interpolation=cv2.INTER_AREA)[None]


def version_dir(name: str = MODEL) -> Path:
    return resolve_version(STORE, name)


# --- peers -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """KServe's ModelServer on loopback serving efficientnet_lite0 as bench/kserve_peer.py does, and the same IR
    and the gender network (FP32 NCHW RGB, mean and std) described in their metadata."""
    try:
        python = peer_python(DEFAULT_VENV)
    except (subprocess.CalledProcessError, OSError) as error:
        pytest.skip(f"pip could not install {KSERVE} into {DEFAULT_VENV} ({error}): no KServe ModelServer to test "
                    "against")
    folder = tmp_path_factory.mktemp("kserve")
    script = folder / "peer.py"
    script.write_text(PEER.format(repo=str(REPO)))
    models = [{"name": MODEL, "network": str(version_dir() / "model.xml"), "described": False},
              {"name": "described_lite0", "network": str(version_dir() / "model.xml"), "described": True},
              {"name": "gender", "network": str(version_dir("gender") / "model.onnx"), "described": True}]
    port = free_port()
    log_path = folder / "peer.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(python), "-P", str(script), str(port), json.dumps(models)], stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def appliance_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Another appliance: projects/classify-objects with its `kserve` API."""
    server = start_server(REPO / "projects" / "classify-objects",
                          log_file=tmp_path_factory.mktemp("peer") / "server.log", log_level="INFO")
    yield server
    server.stop()


def served_infers(server: Server) -> float:
    """Inference requests the peer appliance received on its KServe API, from its own /metrics."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("appliance_requests_total{") and "/infer" in line and 'api="kserve"' in line)


class Relay:
    """A TCP relay on loopback between the appliance and a real peer, for the faults of a network: `forward`
    (bytes both ways), `reset` (the connection closes before any answer: the server died mid-request), `hang`
    (the server never answers), `busy` (an HTTP 503 answer), `down` (nothing listens: connection refused).
    Changing the mode closes the connections open through it, as a dying server would."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.mode = "forward"
        self.accepted: dict[str, int] = {}
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def set(self, mode: str) -> None:
        with self._lock:
            for connection in self._open:
                # shutdown first: close() alone leaves a socket that another thread reads open, with no FIN.
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self._open.clear()
            if mode == "down" and self._listener is not None:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of its thread, which ends
                self._listener.close()
                self._listener = None
            elif mode != "down" and self._listener is None:
                self._listen()
            self.mode = mode

    def close(self) -> None:
        self.set("down")

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                self.accepted[mode] = self.accepted.get(mode, 0) + 1
                self._open.append(client)
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        try:
            if mode == "reset":
                read_request(client)
                # RST, not FIN: what the client sees of a server killed while its request was on the wire.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
            elif mode == "hang":
                while client.recv(65536):
                    pass
            elif mode == "busy":
                read_request(client)
                body = b'{"error": "all model instances busy"}'
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                client.close()
            else:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                with self._lock:
                    self._open.append(upstream)
                threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
                self._pipe(client, upstream)
        except OSError:
            pass

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.close()
                except OSError:
                    pass


def read_request(client: socket.socket) -> None:
    """One whole HTTP request (headers, then Content-Length bytes), so that what follows is an answer to it."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = client.recv(65536)
        if not chunk:
            return
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = client.recv(65536)
        if not chunk:
            return
        body += chunk


@pytest.fixture
def relay(appliance_server: Server) -> Iterator[Relay]:
    found = Relay(appliance_server.port)
    yield found
    found.close()


def metric(metrics: Metrics, name: str, **labels: str) -> float | None:
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


# --- the same answers as in this process --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def in_process() -> dict[str, np.ndarray]:
    loaded = OpenVinoModel(MODEL, version_dir(), CPU_F32)
    return loaded.infer(coffee())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_modelserver_gives_the_in_process_probabilities(kserve_server, in_process, binary):
    remote = RemoteModel(MODEL, version_dir(), RemoteSettings(url=kserve_server, binary_tensors=binary))
    # KServe's custom model calls its output `output-0`: the nodes still find it under the network's name.
    assert remote.output_names == ["probabilities"]
    answer = remote.infer(coffee())
    np.testing.assert_allclose(answer["probabilities"], in_process["probabilities"], atol=1e-6)
    assert int(np.argmax(answer["probabilities"])) == int(np.argmax(in_process["probabilities"]))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_another_appliance_gives_the_in_process_probabilities(appliance_server, in_process, binary):
    remote = RemoteModel(MODEL, version_dir(), RemoteSettings(url=appliance_server.url, binary_tensors=binary))
    assert (remote.input.shape, remote.input.any_size) == ((1, 224, 224, 3), False)
    answer = remote.infer(coffee())
    np.testing.assert_allclose(answer["probabilities"], in_process["probabilities"], atol=1e-6)
    assert remote.metadata()["remote"] == {"url": appliance_server.url, "circuit": "closed",
                                           "failed_calls_in_a_row": 0}


def test_a_network_that_takes_fp32_nchw_rgb_is_prepared_on_the_appliance(kserve_server):
    """gender takes FP32 NCHW RGB, (pixel - mean) / std: the remote serves the ONNX network as it is, and the
    appliance's numpy steps give the probabilities OpenVINO's pre-processing in the graph gives."""
    face = cv2.resize(cv2.cvtColor(data.astronaut()[30:230, 150:330], cv2.COLOR_RGB2BGR), (32, 32))[None]
    local = OpenVinoModel("gender", version_dir("gender"), CPU_F32).infer(face)
    remote = RemoteModel("gender", version_dir("gender"), RemoteSettings(url=kserve_server))
    answer = remote.infer(face)
    np.testing.assert_allclose(answer["probabilities"], local["probabilities"], atol=1e-5)


def test_a_remote_describing_frames_as_its_input_takes_them(kserve_server, in_process):
    remote = RemoteModel(MODEL, version_dir(), RemoteSettings(url=kserve_server, models={MODEL: "described_lite0"}))
    assert remote.remote_name == "described_lite0"
    np.testing.assert_allclose(remote.infer(coffee())["probabilities"], in_process["probabilities"], atol=1e-6)


# --- refused at load ----------------------------------------------------------------------------------------------


def test_a_remote_without_the_model_is_refused_at_load_naming_model_and_url(kserve_server, appliance_server):
    for url in (kserve_server, appliance_server.url):
        with pytest.raises(StoreError) as refused:
            RemoteModel(MODEL, version_dir(), RemoteSettings(url=url, models={MODEL: "espresso_net"}))
        message = str(refused.value)
        assert message.startswith(f"model '{MODEL}' (remote 'espresso_net' at {url}): not found at {url} "
                                  "(GET /v2/models/espresso_net answered 404: ")
        assert message.endswith("); serve it there under that name, or map the store name in the profile's "
                                "remote.models")


def test_a_remote_input_that_fits_neither_frames_nor_the_network_is_refused(kserve_server):
    with pytest.raises(StoreError) as refused:
        RemoteModel(MODEL, version_dir(), RemoteSettings(url=kserve_server, models={MODEL: "gender"}))
    assert str(refused.value) == (
        f"model '{MODEL}' (remote 'gender' at {kserve_server}): takes FP32 [-1, 3, 32, 32]; the appliance sends "
        "UINT8 [1, 224, 224, 3] (u8 BGR frames, NHWC) or UINT8 [1, 224, 224, 3] (the network's input per "
        "spec.yaml: u8 NHWC BGR)")


def test_a_reshape_is_refused_at_load(appliance_server):
    with pytest.raises(StoreError) as refused:
        RemoteModel(MODEL, version_dir(), RemoteSettings(url=appliance_server.url), input_shape=(-1, 224, 224))
    assert str(refused.value) == (
        f"model '{MODEL}' (remote '{MODEL}' at {appliance_server.url}): a remote model cannot be reshaped to "
        "[-1, 224, 224] (batch, height, width); it runs at the size it is served with, the spec's 1 x 224 x 224. "
        "Use a local firmware profile (cpu, igpu, npu) for this node")


def test_a_server_that_is_not_there_is_refused_at_load():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreError) as refused:
        RemoteModel(MODEL, version_dir(), RemoteSettings(url=url, retries=0))
    assert str(refused.value) == f"model '{MODEL}' (remote '{MODEL}' at {url}): cannot connect (connection refused)"


def test_an_unset_url_variable_is_refused_at_load(monkeypatch):
    monkeypatch.delenv("APPLIANCE_KSERVE_URL", raising=False)
    profile, problems = load_profile("kserve")
    assert profile is not None and profile.remote is not None and not problems
    with pytest.raises(StoreError) as refused:
        RemoteModel(MODEL, version_dir(), profile.remote)
    assert str(refused.value) == (f"model '{MODEL}': the firmware profile's remote.url.env: environment variable "
                                  "APPLIANCE_KSERVE_URL is not set")


# --- failures at inference: errors, retries, timeouts, the breaker ------------------------------------------------


def test_a_remote_that_dies_opens_the_breaker_and_no_request_is_sent_while_open(appliance_server, relay):
    metrics = Metrics("test", "0" * 64)
    settings = RemoteSettings(url=relay.url, retries=0, breaker={"failures": 2, "cool_down_s": 1.0})
    remote = RemoteModel(MODEL, version_dir(), settings, observer=metrics)
    label = f"127.0.0.1:{relay.port}"
    remote.infer(coffee())
    assert metric(metrics, "appliance_remote_circuit_state", remote=label) == 0

    relay.set("reset")  # the server dies in the middle of each request
    for _ in range(2):
        with pytest.raises(RemoteUnavailable) as failed:
            remote.infer(coffee())
        assert str(failed.value) == (f"model '{MODEL}' on {relay.url}: the connection failed during the request "
                                     "(connection reset)")
    assert relay.accepted["reset"] == 2
    assert metric(metrics, "appliance_remote_circuit_state", remote=label) == 2

    relay.set("forward")  # the server is back, but the breaker waits out its cool-down
    before, forwarded = served_infers(appliance_server), relay.accepted["forward"]
    with pytest.raises(RemoteUnavailable) as refused:
        remote.infer(coffee())
    message = str(refused.value)
    assert message.startswith(f"model '{MODEL}' on {relay.url}: not called: circuit breaker open after 2 failed "
                              "calls in a row (last: the connection failed during the request (connection "
                              "reset)); next try in ")
    assert (served_infers(appliance_server), relay.accepted["forward"]) == (before, forwarded)
    assert metric(metrics, "appliance_remote_failures_total", remote=label, kind="circuit_open") == 1
    assert metric(metrics, "appliance_remote_failures_total", remote=label, kind="disconnected") == 2

    deadline = time.monotonic() + 10
    while remote.health()["circuit"] != "half-open" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(metrics, "appliance_remote_circuit_state", remote=label) == 1
    remote.infer(coffee())  # the trial call goes through and closes the breaker
    assert served_infers(appliance_server) == before + 1
    assert remote.health() == {"url": relay.url, "circuit": "closed", "failed_calls_in_a_row": 0}
    assert metric(metrics, "appliance_remote_requests_total", remote=label) == 2


def test_a_failed_trial_call_opens_the_breaker_again(appliance_server, relay):
    settings = RemoteSettings(url=relay.url, retries=0, breaker={"failures": 1, "cool_down_s": 0.5})
    remote = RemoteModel(MODEL, version_dir(), settings)
    relay.set("down")
    with pytest.raises(RemoteUnavailable, match="cannot connect"):
        remote.infer(coffee())
    while remote.health()["circuit"] != "half-open":
        time.sleep(0.05)
    with pytest.raises(RemoteUnavailable, match="cannot connect"):
        remote.infer(coffee())  # the trial
    assert remote.health()["circuit"] == "open"
    with pytest.raises(RemoteUnavailable, match="circuit breaker open after 2 failed calls in a row"):
        remote.infer(coffee())


def test_a_refused_connection_is_tried_again_and_counted(appliance_server, relay):
    metrics = Metrics("test", "0" * 64)
    remote = RemoteModel(MODEL, version_dir(), RemoteSettings(url=relay.url, retries=2, retry_backoff_s=0.01),
                         observer=metrics)
    relay.set("down")
    with pytest.raises(RemoteUnavailable) as failed:
        remote.infer(coffee())
    assert str(failed.value) == f"model '{MODEL}' on {relay.url}: cannot connect (connection refused)"
    label = f"127.0.0.1:{relay.port}"
    assert metric(metrics, "appliance_remote_retries_total", remote=label) == 2
    assert metric(metrics, "appliance_remote_failures_total", remote=label, kind="connect") == 1


def test_a_busy_remote_is_asked_again_retries_times(appliance_server, relay):
    remote = RemoteModel(MODEL, version_dir(), RemoteSettings(url=relay.url, retries=2, retry_backoff_s=0.01))
    relay.set("busy")
    with pytest.raises(RemoteUnavailable) as failed:
        remote.infer(coffee())
    assert str(failed.value) == f"model '{MODEL}' on {relay.url}: answered 503 (all model instances busy)"
    assert relay.accepted["busy"] == 3


def test_a_remote_that_does_not_answer_times_out_and_is_not_asked_again(appliance_server, relay):
    remote = RemoteModel(MODEL, version_dir(), RemoteSettings(url=relay.url, timeout_s=0.5, retries=2))
    relay.set("hang")
    with pytest.raises(RemoteUnavailable) as failed:
        remote.infer(coffee())
    assert str(failed.value) == f"model '{MODEL}' on {relay.url}: no answer within 0.5 s (remote.timeout_s)"
    assert relay.accepted["hang"] == 1  # the server may have run it: never sent twice


def test_a_frame_of_another_size_is_a_clear_error(appliance_server):
    remote = RemoteModel(MODEL, version_dir(), RemoteSettings(url=appliance_server.url))
    with pytest.raises(RemoteUnavailable) as failed:
        remote.infer(np.zeros((2, 224, 224, 3), np.uint8))
    assert str(failed.value) == (f"model '{MODEL}': a remote model takes one u8 BGR frame of 224x224 "
                                 "(1 x 224 x 224 x 3), got uint8 [2, 224, 224, 3]")


# --- the profile ----------------------------------------------------------------------------------------------


def test_the_kserve_profile_takes_its_url_from_the_environment(monkeypatch):
    profile, problems = load_profile("kserve")
    assert isinstance(profile, FirmwareProfile) and not problems
    assert profile.device == "kserve" and profile.remote is not None
    monkeypatch.setenv("APPLIANCE_KSERVE_URL", "http://10.0.0.5:8000/")
    assert profile.remote.resolved_url() == "http://10.0.0.5:8000"
    monkeypatch.setenv("APPLIANCE_KSERVE_URL", "10.0.0.5:8000")
    with pytest.raises(ValueError) as refused:
        profile.remote.resolved_url()
    assert str(refused.value) == ("remote.url.env: APPLIANCE_KSERVE_URL: '10.0.0.5:8000' is not an http:// or "
                                  "https:// URL with a host (e.g. http://10.0.0.5:8000)")


def test_a_profile_with_a_bad_remote_is_refused_with_its_place(tmp_path):
    (tmp_path / "remote.yaml").write_text(
        "name: remote\ndescription: x\ndevice: kserve\n"
        "remote:\n  url: http://user:secret@10.0.0.5:8000\n  retries: -1\n  breaker: {failures: 0}\n")
    (tmp_path / "half.yaml").write_text("name: half\ndescription: x\ndevice: kserve\n")
    profile, problems = load_profile("remote", tmp_path)
    assert profile is None
    shown = [str(problem) for problem in problems]
    where = f"{tmp_path / 'remote.yaml'}"
    assert f"{where}:5:8 remote.url: the URL must not carry a user, password, query or fragment " \
           "(give a key as api_key)" in shown
    assert any(line.startswith(f"{where}:6:12 remote.retries: ") for line in shown)
    assert any(line.startswith(f"{where}:7:23 remote.breaker.failures: ") for line in shown)
    assert "secret" not in " ".join(shown)
    _, problems = load_profile("half", tmp_path)
    assert [problem.message for problem in problems] == [
        "device 'kserve' needs `remote: {url: ...}` saying which server"]


# --- the flow through the kserve profile ----------------------------------------------------------------------


def kserve_project(folder: Path, url: str, monkeypatch: pytest.MonkeyPatch, **remote: object) -> Path:
    """A project serving flows/classify_objects.yaml with the shipped `kserve` profile (the URL from
    APPLIANCE_KSERVE_URL), or with a copy of it carrying ``remote`` settings."""
    monkeypatch.setenv("APPLIANCE_KSERVE_URL", url)
    if remote:
        profiles = folder / "profiles"
        profiles.mkdir(parents=True)
        shipped = yaml.safe_load((REPO / "appliance" / "firmware_profiles" / "kserve.yaml").read_text())
        shipped["remote"].update(remote)
        (profiles / "kserve.yaml").write_text(yaml.safe_dump(shipped))
        monkeypatch.setenv("APPLIANCE_PROFILES_DIR", str(profiles))
    flow = yaml.safe_load(FLOW.read_text())
    return write_project(folder / "project", flow, models_dir=str(STORE), firmware_profile="kserve")


def classify(project: Project, image: np.ndarray) -> dict:
    ctx = project.inspect(Frame(image, "test"), "")
    return {"result": ctx["result"], "classification": ctx.get("classification"), "errors": ctx.get("errors")}


PICTURES = {"coffee 224x224": lambda: coffee()[0], "coffee 600x400": lambda: cv2.cvtColor(data.coffee(),
                                                                                          cv2.COLOR_RGB2BGR)}


@pytest.fixture(scope="module")
def in_process_answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    flow = yaml.safe_load(FLOW.read_text())
    project = Project.load(write_project(tmp_path_factory.mktemp("local"), flow, models_dir=str(STORE)))
    project.prepare()
    try:
        return {name: classify(project, picture()) for name, picture in PICTURES.items()}
    finally:
        project.close()


def scores(answer: dict) -> list[tuple[str, float]]:
    return [(entry["label_name"], entry["score"]) for result in answer["classification"]
            for entry in result["predicted"] + result.get("discarded", [])]


@pytest.mark.parametrize("peer", ["kserve", "appliance"])
def test_the_classify_flow_through_the_kserve_profile_answers_as_in_process(tmp_path, monkeypatch, peer,
                                                                            in_process_answers, request):
    url = request.getfixturevalue("kserve_server") if peer == "kserve" else \
        request.getfixturevalue("appliance_server").url
    project = Project.load(kserve_project(tmp_path, url, monkeypatch))
    project.prepare()
    try:
        loaded = project.runtime.slots[MODEL].current
        assert loaded is not None and loaded.device == f"kserve {url}" and loaded.precision == "remote"
        answers = {name: classify(project, picture()) for name, picture in PICTURES.items()}
    finally:
        project.close()
    for name, answer in answers.items():
        assert answer["result"] is True and answer["errors"] in (None, []), name
        ours, theirs = scores(answer), scores(in_process_answers[name])
        assert [label for label, _ in ours] == [label for label, _ in theirs] and ours, name
        # At the model's size no resize happens: the same numbers. A larger frame is resized by the node for a
        # remote model (cv2, INTER_AREA) and inside OpenVINO's graph in-process: the scores move by about 1e-3.
        tolerance = 1e-5 if name == "coffee 224x224" else 3e-3
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=tolerance, err_msg=name)


def test_a_remote_that_dies_fails_the_node_with_a_clear_error(tmp_path, monkeypatch, relay):
    project = Project.load(kserve_project(tmp_path, relay.url, monkeypatch, retries=0))
    project.prepare()
    try:
        relay.set("down")
        answer = classify(project, cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))
    finally:
        project.close()
    assert answer["result"] is False
    assert answer["errors"] == [{"node": "what", "type": "NodeError",
                                 "message": f"model '{MODEL}' on {relay.url}: cannot connect (connection refused)"}]


def test_a_node_that_reshapes_its_model_is_refused_at_check_with_its_place(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_KSERVE_URL", "http://127.0.0.1:9")
    flow = yaml.safe_load((REPO / "flows" / "ocr_label.yaml").read_text())  # an ocr@1 node
    folder = write_project(tmp_path / "ocr", flow, models_dir=str(STORE), firmware_profile="kserve")
    with pytest.raises(ConfigError) as refused:
        Project.load(folder)
    assert any("flow.yaml:" in problem and "remote" in problem and "reshape" in problem
               for problem in refused.value.problems), refused.value.problems


def test_the_served_appliance_shows_the_breaker_in_metrics(tmp_path, monkeypatch, relay):
    folder = kserve_project(tmp_path, relay.url, monkeypatch, retries=0, breaker={"failures": 1, "cool_down_s": 300})
    server = start_server(folder)  # with this test's APPLIANCE_KSERVE_URL and APPLIANCE_PROFILES_DIR
    try:
        image = cv2.imencode(".png", cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR))[1].tobytes()
        assert requests.post(f"{server.url}/analyze_image", data=image, timeout=30).json()["result"] is True
        relay.set("down")
        for expected in ("cannot connect (connection refused)", "not called: circuit breaker open after 1 failed"):
            answer = requests.post(f"{server.url}/analyze_image", data=image, timeout=30)
            assert answer.status_code == 200
            (error,) = answer.json()["errors"]
            assert error["type"] == "NodeError" and expected in error["message"]
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        label = f'remote="127.0.0.1:{relay.port}"'
        assert f"appliance_remote_circuit_state{{{label}}} 2.0" in text
        assert f'appliance_remote_failures_total{{kind="circuit_open",{label}}} 1.0' in text
        assert f"appliance_remote_requests_total{{{label}}} 1.0" in text
    finally:
        server.stop()
