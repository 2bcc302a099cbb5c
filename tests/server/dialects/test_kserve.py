"""KServe v2 (Open Inference Protocol): the reference client `tritonclient[http]` 2.73.0 and plain HTTP against a
project whose flow classifies with EfficientNet-lite0 (PEKAT and KServe on one port), served in this process on
127.0.0.1.

The store has version 1 of the model and a version 2 that reads the same weights with its input declared RGB:
the appliance then swaps the frame's channels in the graph, so version 2 answers other probabilities for the
same tensor and every answer shows which compiled version computed it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import skimage.data
import tritonclient.http as httpclient
from aiohttp.test_utils import TestClient, TestServer
from tritonclient.utils import InferenceServerException

from appliance.project import Project
from appliance.runtime.store import write_manifest
from appliance.server.app import create_app
from appliance.server.core import STATE
from tests.conftest import REPO, start_in_process, write_project

MODEL = "efficientnet_lite0"
ESPRESSO = 967
HOLD_S = 3.0
# The flow of projects/classify-objects, then a hook that holds the worker when a PEKAT request's data says so
# (the overload test fills the workers and the queue with them).
FLOW = {"nodes": {
    "what": {"type": "classify@1", "model": MODEL, "fit": "center_crop", "threshold": 0.2, "max_predictions": 3,
             "show_discarded": True, "next": ["hold"]},
    "hold": {"type": "code@1", "module": "hold"}}}
HOLD_HOOK = f"import time\ndef main(context):\n    if context['data'] == 'hold':\n        time.sleep({HOLD_S})\n"
COFFEE_BGR = cv2.cvtColor(skimage.data.coffee(), cv2.COLOR_RGB2BGR)


def model_frame(image: np.ndarray = COFFEE_BGR) -> np.ndarray:
    """The frame as classify@1 gives it to the model (fit: center_crop, then INTER_AREA to 224x224), batched."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return cv2.resize(image[top:top + side, left:left + side], (224, 224), interpolation=cv2.INTER_AREA)[None]


def model_store(folder: Path) -> Path:
    store = folder / "models"
    model = store / MODEL
    (model / "2").mkdir(parents=True)
    (model / "1").symlink_to(REPO / "models" / MODEL / "1")
    for name in ("model.xml", "model.bin"):
        (model / "2" / name).symlink_to(REPO / "models" / MODEL / "1" / name)
    spec = (REPO / "models" / MODEL / "1" / "spec.yaml").read_text()
    assert spec.count("colour_order: BGR\n") == 1
    (model / "2" / "spec.yaml").write_text(spec.replace("colour_order: BGR\n", "colour_order: RGB\n"))
    write_manifest(model / "2")
    (model / "current").write_text("1")
    return store


def classify_project(folder: Path, **settings) -> Path:
    store = model_store(folder)
    return write_project(folder / "project", FLOW, hooks={"hold": HOLD_HOOK}, models_dir=str(store),
                         apis=["pekat", "kserve"], **{"limits": {"queue_depth": 1, "hook_timeout_s": 10}, **settings})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_in_process(classify_project(tmp_path_factory.mktemp("kserve")))
    yield started
    started.stop()


@pytest.fixture
def client(server) -> httpclient.InferenceServerClient:
    with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as found:
        yield found


def infer(client: httpclient.InferenceServerClient, frame: np.ndarray, *, binary: bool = True, version: str = ""
          ) -> httpclient.InferResult:
    given = httpclient.InferInput("input", list(frame.shape), "UINT8")
    given.set_data_from_numpy(frame, binary_data=binary)
    wanted = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    return client.infer(MODEL, [given], outputs=[wanted], model_version=version)


def refused(call) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as caught:
        call()
    return int(caught.value.status()), caught.value.message()


def in_process_probabilities(server, frame: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The same model compiled here as the server compiles it (the project's profile), on the same tensor."""
    project = Project.load(server.project_dir)
    project.prepare()
    try:
        return project.runtime.slots[MODEL].current.infer(frame)["probabilities"]
    finally:
        project.close()


# --- metadata and health ----------------------------------------------------------------------------------------


def test_server_and_model_metadata_and_readiness_as_tritonclient_reads_them(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {"name": "appliance", "version": "0.1.0",
                                            "extensions": ["binary_tensor_data"]}
    expected = {"name": MODEL, "versions": ["1", "2"], "platform": "openvino_ir",
                "inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 224, 224, 3]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 1000]}]}
    assert client.get_model_metadata(MODEL) == expected
    assert client.get_model_metadata(MODEL, "1") == expected
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("nope")
    answers = [requests.get(f"{server.url}{path}", timeout=5) for path in
               ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", "/v2/models")]
    assert [(a.status_code, a.json()) for a in answers] == [
        (200, {"live": True}), (200, {"ready": True}), (200, {"name": MODEL, "ready": True}),
        (200, {"models": [MODEL]})]


# --- inference --------------------------------------------------------------------------------------------------


def test_coffee_through_binary_and_json_tensors_answers_the_pekat_top_class_and_the_models_probabilities(client,
                                                                                                        server):
    frame = model_frame()
    pekat = requests.post(f"{server.url}/analyze_image", data=cv2.imencode(".png", COFFEE_BGR)[1].tobytes(),
                          timeout=30).json()
    assert pekat["classNames"][0]["id"] == ESPRESSO and pekat["result"] is True
    expected = in_process_probabilities(server, frame)
    for binary in (True, False):
        answer = infer(client, frame, binary=binary)
        probabilities = answer.as_numpy("probabilities")
        assert probabilities.shape == (1, 1000) and probabilities.dtype == np.float32
        assert int(np.argmax(probabilities)) == ESPRESSO
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
        output = answer.get_response()["outputs"][0]
        assert ("parameters" in output, "data" in output) == (binary, not binary)
        assert answer.get_response()["model_name"] == MODEL and answer.get_response()["model_version"] == "1"


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_a_compressed_request_as_tritonclient_sends_it_is_inflated(client, compression):
    frame = model_frame()
    given = httpclient.InferInput("input", list(frame.shape), "UINT8")
    given.set_data_from_numpy(frame, binary_data=True)
    answer = client.infer(MODEL, [given], request_compression_algorithm=compression)
    assert int(np.argmax(answer.as_numpy("probabilities"))) == ESPRESSO


def test_binary_answer_is_the_json_header_then_the_little_endian_floats(server):
    """The bytes on the wire, as the extension defines them: header length in Inference-Header-Content-Length."""
    frame = model_frame()
    header = json.dumps({"id": "frame-17", "inputs": [{"name": "input", "shape": [1, 224, 224, 3],
                                                       "datatype": "UINT8",
                                                       "parameters": {"binary_data_size": frame.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    answer = requests.post(f"{server.url}/v2/models/{MODEL}/infer", data=header + frame.tobytes(), timeout=30,
                           headers={"Inference-Header-Content-Length": str(len(header)),
                                    "Content-Type": "application/octet-stream"})
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/octet-stream"
    length = int(answer.headers["Inference-Header-Content-Length"])
    head = json.loads(answer.content[:length])
    assert head == {"model_name": MODEL, "model_version": "1", "id": "frame-17", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 1000], "parameters": {"binary_data_size": 4000}}]}
    probabilities = np.frombuffer(answer.content[length:], "<f4")
    assert probabilities.size == 1000 and int(np.argmax(probabilities)) == ESPRESSO


def test_a_json_body_as_curl_sends_it_answers_json(server):
    frame = model_frame()
    body = {"inputs": [{"name": "input", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                        "data": frame.tolist()}]}  # nested, as the protocol allows besides flat
    answer = requests.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    assert "Inference-Header-Content-Length" not in answer.headers
    (output,) = answer.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [1, 1000])
    assert int(np.argmax(output["data"])) == ESPRESSO
    # Without `outputs`, binary_data_output decides for every output.
    body["parameters"] = {"binary_data_output": True}
    answer = requests.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert int(answer.headers["Inference-Header-Content-Length"]) == len(answer.content) - 4000


def test_a_version_is_pinned_through_the_store_beside_the_running_one(client):
    frame = model_frame()
    first = infer(client, frame, version="1")
    second = infer(client, frame, version="2")
    assert first.get_response()["model_version"] == "1" and second.get_response()["model_version"] == "2"
    # Version 2 takes RGB: the graph swaps the channels, so its probabilities are those of the swapped frame.
    swapped = infer(client, np.ascontiguousarray(frame[..., ::-1]), version="1")
    np.testing.assert_allclose(second.as_numpy("probabilities"), swapped.as_numpy("probabilities"), rtol=0,
                               atol=1e-6)
    assert not np.allclose(first.as_numpy("probabilities"), second.as_numpy("probabilities"), atol=1e-3)
    assert client.is_model_ready(MODEL, "2")
    assert client.get_model_metadata(MODEL, "2")["versions"] == ["1", "2"]
    # The unversioned path still runs the flow's version.
    assert infer(client, frame).get_response()["model_version"] == "1"


# --- errors -----------------------------------------------------------------------------------------------------


def test_unknown_model_and_version_are_404_in_kserves_shape(client, server):
    frame = model_frame()
    given = httpclient.InferInput("input", list(frame.shape), "UINT8")
    given.set_data_from_numpy(frame)
    served = "this project serves efficientnet_lite0 (the models its flows use, by store name)"
    assert refused(lambda: client.infer("nope", [given])) == (404, f"unknown model 'nope'; {served}")
    assert refused(lambda: client.get_model_metadata("face_full")) == (404, f"unknown model 'face_full'; {served}")
    assert refused(lambda: client.infer(MODEL, [given], model_version="7")) == (
        404, "model 'efficientnet_lite0' has no version '7'; versions: 1, 2")
    assert refused(lambda: client.get_model_metadata(MODEL, "..")) == (
        404, "model 'efficientnet_lite0' has no version '..'; versions: 1, 2")
    answer = requests.get(f"{server.url}/v2/models/{MODEL}/versions/7/ready", timeout=5)
    assert (answer.status_code, answer.json()) == (
        404, {"error": "model 'efficientnet_lite0' has no version '7'; versions: 1, 2"})
    answer = requests.get(f"{server.url}/v2/repository/index", timeout=5)
    assert answer.status_code == 404 and answer.json()["error"].startswith(
        "no endpoint at /v2/repository/index; endpoints: /v2, /v2/health/live, ")
    answer = requests.delete(f"{server.url}/v2/models/{MODEL}", timeout=5)
    assert (answer.status_code, answer.json()) == (
        405, {"error": f"method DELETE is not allowed on /v2/models/{MODEL}; use GET,HEAD"})


def test_a_tensor_of_the_wrong_shape_or_datatype_is_refused_by_tritonclient(client):
    small = np.zeros((1, 100, 100, 3), np.uint8)
    given = httpclient.InferInput("input", list(small.shape), "UINT8")
    given.set_data_from_numpy(small)
    assert refused(lambda: client.infer(MODEL, [given])) == (
        400, "input 'input': shape [1, 100, 100, 3] does not fit the model's [1, 224, 224, 3]; send the frame "
             "resized to 224x224 (width x height), u8 BGR, NHWC")
    floats = model_frame().astype(np.float32)
    given = httpclient.InferInput("input", list(floats.shape), "FP32")
    given.set_data_from_numpy(floats)
    assert refused(lambda: client.infer(MODEL, [given])) == (
        400, "input 'input': datatype \"FP32\" is not the model's UINT8 (u8 BGR frames, as the flow's nodes give "
             "them)")
    frame = model_frame()
    given = httpclient.InferInput("image", list(frame.shape), "UINT8")
    given.set_data_from_numpy(frame)
    assert refused(lambda: client.infer(MODEL, [given])) == (
        400, "model 'efficientnet_lite0' has no input \"image\"; its input is 'input' (UINT8 [1, 224, 224, 3]: u8 "
             "BGR frames, NHWC)")
    given = httpclient.InferInput("input", list(frame.shape), "UINT8")
    given.set_data_from_numpy(frame)
    wanted = httpclient.InferRequestedOutput("logits")
    assert refused(lambda: client.infer(MODEL, [given], outputs=[wanted])) == (
        400, "model 'efficientnet_lite0' has no output \"logits\"; outputs: probabilities")


INPUT = {"name": "input", "shape": [1, 224, 224, 3], "datatype": "UINT8"}
FRAME_BYTES = 224 * 224 * 3


@pytest.mark.parametrize("body, header, message", [
    (b"", None, 'the inference request is empty; send a JSON object {"inputs": [...]}'),
    (b"{inputs", None, "the inference request's body is not JSON: Expecting property name enclosed in double "
                       "quotes: line 1 column 2 (char 1)"),
    (b"[]", None, "the inference request must be a JSON object"),
    (b'{"inputs": []}', None, "inputs must be a non-empty list; model 'efficientnet_lite0' takes one input, 'input' "
                              "(UINT8 [1, 224, 224, 3]: u8 BGR frames, NHWC)"),
    (json.dumps({"inputs": [INPUT]}).encode(), None,
     "input 'input' has no data: give `data` (a list of numbers in row-major order) or send it as binary data "
     "(parameters.binary_data_size)"),
    (json.dumps({"inputs": [{**INPUT, "data": [1, 2, 3]}]}).encode(), None,
     "input 'input': data has 3 values; shape [1, 224, 224, 3] needs 150528"),
    (json.dumps({"inputs": [{**INPUT, "data": [300] * FRAME_BYTES}]}).encode(), None,
     "input 'input': UINT8 data must be integers from 0 to 255"),
    (json.dumps({"inputs": [{**INPUT, "data": [0.5] * FRAME_BYTES}]}).encode(), None,
     "input 'input': UINT8 data must be integers"),
    (json.dumps({"inputs": [{**INPUT, "shape": [1, 224, 224]}]}).encode(), None,
     "input 'input': shape [1, 224, 224] does not fit the model's [1, 224, 224, 3]; send the frame resized to "
     "224x224 (width x height), u8 BGR, NHWC"),
    (json.dumps({"inputs": [{**INPUT, "shape": "1x224x224x3"}]}).encode(), None,
     'inputs[0].shape must be a list of sizes (integers >= 0), got "1x224x224x3"'),
    (json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": FRAME_BYTES}}]}).encode(), None,
     "input 'input' has parameters.binary_data_size but the request has no Inference-Header-Content-Length "
     "header saying where its JSON ends"),
    (json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": 12}}]}).encode(), "header",
     "input 'input': binary_data_size 12; shape [1, 224, 224, 3] of UINT8 is 150528 bytes"),
    (json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": FRAME_BYTES}}]}).encode() + bytes(100),
     "header", "input 'input': 150528 bytes of binary data announced, 100 left in the body after the JSON header"),
    (json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": FRAME_BYTES}}]}).encode()
     + bytes(FRAME_BYTES + 1), "header",
     "the body has 150529 bytes after the JSON header; the inputs' binary_data_size add up to 150528"),
    (json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": FRAME_BYTES}}]}).encode()
     + bytes(FRAME_BYTES), "12x", "Inference-Header-Content-Length must be the JSON header's length in bytes, from 0 "
                                  "to the body's {size}; got '12x'"),
    (json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": FRAME_BYTES}},
                            {**INPUT, "parameters": {"binary_data_size": FRAME_BYTES}}]}).encode()
     + bytes(2 * FRAME_BYTES), "header", "input 'input' is given twice"),
    (json.dumps({"inputs": [{**INPUT, "data": [0] * FRAME_BYTES}], "parameters": {"binary_data_output": "yes"}}
                ).encode(), None, 'request.parameters.binary_data_output must be true or false, got "yes"'),
], ids=["empty", "not-json", "not-object", "no-inputs", "no-data", "data-count", "data-range", "data-floats",
        "shape-rank", "shape-type", "binary-without-header", "binary-size", "binary-short", "binary-long",
        "header-length", "input-twice", "binary-output-flag"])
def test_a_bad_request_is_400_saying_what_is_expected(server, body, header, message):
    headers = {}
    if header == "header":
        headers["Inference-Header-Content-Length"] = str(body.index(b"}]}") + 3)
    elif header is not None:
        headers["Inference-Header-Content-Length"] = header
    answer = requests.post(f"{server.url}/v2/models/{MODEL}/infer", data=body, headers=headers, timeout=30)
    assert (answer.status_code, answer.json()) == (400, {"error": message.replace("{size}", str(len(body)))})


def test_busy_workers_and_a_full_queue_answer_503_with_retry_after(client, server):
    """Every worker holds a PEKAT frame and one more waits (queue_depth 1): the inference is refused at once."""
    holders = [threading.Thread(target=requests.post, args=(f"{server.url}/analyze_image?data=hold",),
                                kwargs={"data": cv2.imencode(".png", COFFEE_BGR)[1].tobytes(), "timeout": 30})
               for _ in range((os.cpu_count() or 1) + 1)]
    for holder in holders:
        holder.start()
    try:
        deadline = time.monotonic() + HOLD_S - 0.5  # before the first held frame is let go
        while requests.get(f"{server.url}/health", timeout=5).json()["queued"] < 1:
            assert time.monotonic() < deadline, "the held frames never filled the queue"
            time.sleep(0.01)
        frame = model_frame()
        header = json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": frame.nbytes}}]}).encode()
        answer = requests.post(f"{server.url}/v2/models/{MODEL}/infer", data=header + frame.tobytes(), timeout=30,
                               headers={"Inference-Header-Content-Length": str(len(header))})
        assert (answer.status_code, answer.json()) == (503, {"error": "busy: queue of 1 is full"})
        assert int(answer.headers["Retry-After"]) >= 1
    finally:
        for holder in holders:
            holder.join()
    assert infer(client, model_frame()).get_response()["model_version"] == "1"


def test_a_hot_swap_while_serving_moves_kserve_and_the_flow_together_without_a_failed_request(server):
    frame = model_frame()
    seen: list[tuple[float, float, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def camera() -> None:
        with httpclient.InferenceServerClient(server.url.removeprefix("http://")) as own:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    version = infer(own, frame).get_response()["model_version"]
                except InferenceServerException as error:
                    failures.append(str(error))
                    continue
                seen.append((started, time.monotonic(), version))

    png = cv2.imencode(".png", COFFEE_BGR)[1].tobytes()
    cameras = [threading.Thread(target=camera) for _ in range(2)]
    for thread in cameras:
        thread.start()
    try:
        time.sleep(0.5)
        switching = time.monotonic()
        switched = requests.post(f"{server.url}/models/switch?model={MODEL}&version=2", timeout=60)
        assert switched.status_code == 200, switched.text
        done = time.monotonic()
        flow = requests.post(f"{server.url}/analyze_image", data=png, timeout=30).json()
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in cameras:
            thread.join()
        requests.post(f"{server.url}/models/switch?model={MODEL}&version=1", timeout=60)
    assert failures == []
    assert {version for _, finished, version in seen if finished < switching} == {"1"}
    assert {version for started, _, version in seen if started > done} == {"2"}
    assert [model["version"] for model in flow["models"]] == ["2"]
    after = requests.post(f"{server.url}/analyze_image", data=png, timeout=30).json()
    assert [model["version"] for model in after["models"]] == ["1"]  # switched back in `finally`


# --- in-process: what needs no process ----------------------------------------------------------------------------


def served(project_dir: Path, check, prepared: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Run ``check(client)`` against the project's app, as `appliance serve` makes it once the flow is prepared
    (or before, while its models compile)."""
    async def run() -> None:
        project = Project.load(project_dir)
        if prepared:
            project.prepare()
        app = create_app(project, workers=1)
        app[STATE].ready = prepared
        async with TestClient(TestServer(app)) as test_client:
            await check(test_client)

    asyncio.run(run())


def test_the_project_key_guards_the_models_but_not_health(tmp_path):
    project = classify_project(tmp_path, api_key="line-key")

    async def check(test_client: TestClient) -> None:
        for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
            assert (await test_client.get(path)).status == 200
        answer = await test_client.get(f"/v2/models/{MODEL}")
        assert (answer.status, await answer.json()) == (401, {"error": "missing API key"})
        answer = await test_client.post(f"/v2/models/{MODEL}/infer", json={}, headers={"X-API-Key": "other"})
        assert (answer.status, await answer.json()) == (401, {"error": "wrong API key"})
        answer = await test_client.get(f"/v2/models/{MODEL}", headers={"X-API-Key": "line-key"})
        assert answer.status == 200 and (await answer.json())["name"] == MODEL

    served(project, check)


def test_a_compressed_body_that_inflates_past_the_body_limit_is_413(tmp_path):
    project = classify_project(tmp_path, limits={"max_body_bytes": 100_000})
    header = json.dumps({"inputs": [{**INPUT, "parameters": {"binary_data_size": FRAME_BYTES}}]}).encode()
    body = gzip.compress(header + bytes(FRAME_BYTES))
    assert len(body) < 1000

    async def check(test_client: TestClient) -> None:
        answer = await test_client.post(f"/v2/models/{MODEL}/infer", data=body, headers={
            "Content-Encoding": "gzip", "Inference-Header-Content-Length": str(len(header))})
        assert (answer.status, await answer.json()) == (
            413, {"error": "body of 100001 bytes exceeds max_body_bytes 100000"})

    served(project, check)


def test_before_the_flow_is_ready_every_model_route_answers_503(tmp_path):
    project = classify_project(tmp_path)
    not_ready = "not ready: preparing the flow's nodes (0 of 2 ready)"

    async def check(test_client: TestClient) -> None:
        assert (await test_client.get("/v2/health/live")).status == 200
        answer = await test_client.get("/v2/health/ready")
        assert (answer.status, await answer.json()) == (503, {"error": not_ready})
        for method, path in (("GET", f"/v2/models/{MODEL}"), ("GET", f"/v2/models/{MODEL}/ready"),
                             ("POST", f"/v2/models/{MODEL}/infer")):
            answer = await test_client.request(method, path)
            assert (answer.status, await answer.json()) == (503, {"error": not_ready})
            assert answer.headers["Retry-After"] == "1"

    served(project, check, prepared=False)
