"""Deepomatic v0.7: the real `deepomatic-api` 1.0.0 client and the document's curl lines against a project with the
objects and faces capabilities, the store's models and an API key, served in this process on 127.0.0.1; private
specs kept across a restart of `appliance serve`."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest
import requests
import skimage.data
from deepomatic.api.client import Client
from deepomatic.api.exceptions import ClientError, TaskError
from deepomatic.api.inputs import ImageInput

from appliance.runtime.store import write_manifest
from tests.conftest import REPO, needs_tool, shared_model_cache_env, start_in_process, start_server, write_project

KEY = "dm-key"
HEADERS = {"X-API-KEY": KEY}
LABELS_V1 = [{"id": 2, "name": "espresso"}, {"id": 1, "name": "ristretto"}]


def jpeg(image, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


COFFEE = jpeg(skimage.data.coffee())
ASTRONAUT = jpeg(skimage.data.astronaut())


def model_store(folder: Path) -> Path:
    """face_full as in the repo's store, and efficientnet_lite0 with version 1 and a version 2 whose label 967
    reads "ristretto" instead of "espresso" (same weights: a moved spec shows which version answered)."""
    store = folder / "models"
    store.mkdir()
    (store / "face_full").symlink_to(REPO / "models" / "face_full")
    model = store / "efficientnet_lite0"
    model.mkdir()
    (model / "1").symlink_to(REPO / "models" / "efficientnet_lite0" / "1")
    shutil.copytree(REPO / "models" / "efficientnet_lite0" / "1", model / "2")
    spec = (model / "2" / "spec.yaml").read_text()
    assert spec.count("name: espresso\n") == 1
    (model / "2" / "spec.yaml").write_text(spec.replace("name: espresso\n", "name: ristretto\n"))
    write_manifest(model / "2")
    (model / "current").write_text("1")
    return store


def vision_project(folder: Path, **settings) -> Path:
    store = model_store(folder)
    return write_project(folder / "project", {"nodes": {"faces": {"type": "faces@1", "model": "face_full"}}},
                         models_dir=str(store), api_key=KEY, apis=["deepomatic"],
                         capabilities={"objects": str(REPO / "flows/vision/objects.yaml"),
                                       "faces": str(REPO / "flows/vision/faces.yaml")}, **settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepomatic")
    started = start_in_process(vision_project(folder, api_settings={"deepomatic": {"url_hosts": ["127.0.0.1"],
                                                                                    "url_timeout_s": 2}}))
    yield started
    started.stop()


@pytest.fixture
def client(server) -> Client:
    return Client(api_key=KEY, host=server.url)


def top(output: dict) -> list[str]:
    labels = output["outputs"][0]["labels"]
    return [entry["label_name"] for entry in labels["predicted"] + labels["discarded"]]


def wait_task(server, task_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = requests.get(f"{server.url}/v0.7/tasks/{task_id}", headers=HEADERS, timeout=5)
        assert answer.status_code == 200, answer.text
        task = answer.json()
        if task["status"] != "pending":
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} still pending")


def coffee_spec(client: Client, name: str = "coffee"):
    return client.RecognitionSpec.create(name=name, outputs=[{"labels": {"roi": "NONE", "exclusive": True,
                                                                         "labels": LABELS_V1}}])


def store_version(client: Client, model: str, version: str) -> int:
    for found in client.RecognitionVersion.list():
        if found["spec_id"] is None and (found["model"], found["model_version"]) == (model, version):
            return found["id"]
    raise AssertionError(f"{model}@{version} not listed")


# --- the client -------------------------------------------------------------------------------------------------


def test_public_specs_are_the_capabilities_and_the_stored_models(client):
    listed = {spec.pk: spec for spec in client.RecognitionSpec.list(public=True)}
    assert list(listed) == ["objects", "faces", "efficientnet_lite0", "face_full"]
    assert "outputs" not in listed["objects"].data()
    faces = client.RecognitionSpec.retrieve("faces")
    assert faces["outputs"] == [{"labels": {"roi": "BBOX", "exclusive": False, "labels": [{"id": 0, "name": "face"}]}}]
    objects = client.RecognitionSpec.retrieve("objects")["outputs"][0]["labels"]
    assert objects["roi"] == "NONE" and len(objects["labels"]) == 1000
    assert {"id": 967, "name": "espresso"} in objects["labels"]


@pytest.mark.parametrize("spec_id", ["objects", "efficientnet_lite0"])
def test_public_inference_from_a_file_bytes_and_base64(client, spec_id):
    spec = client.RecognitionSpec.retrieve(spec_id)
    for image in (ImageInput(io.BytesIO(COFFEE)), ImageInput(COFFEE, encoding="binary"),
                  ImageInput(base64.b64encode(COFFEE), encoding="base64")):
        output = spec.inference(inputs=[image], show_discarded=True, max_predictions=5)
        (first, *_) = output["outputs"][0]["labels"]["predicted"]
        assert (first["label_id"], first["label_name"]) == (967, "espresso")
        # 0.897 since the frame is resized linearly inside the OpenVINO graph (0.94 with OpenCV's area resize).
        assert first["score"] > 0.85 and isinstance(first["threshold"], float)
        assert "roi" not in first


def test_faces_of_the_astronaut_have_a_normalised_box(client):
    output = client.RecognitionSpec.retrieve("faces").inference(inputs=[ImageInput(ASTRONAUT, encoding="binary")])
    (face,) = output["outputs"][0]["labels"]["predicted"]
    assert (face["label_id"], face["label_name"], face["threshold"]) == (0, "face", 0.6)
    assert face["score"] > 0.8
    box = face["roi"]["bbox"]
    assert face["roi"]["region_id"] == 1
    # Her face in the 512x512 picture: about x 165-285, y 60-180.
    assert 0.28 < box["xmin"] < 0.36 and 0.52 < box["xmax"] < 0.6, box
    assert 0.07 < box["ymin"] < 0.15 and 0.32 < box["ymax"] < 0.4, box


def test_max_predictions_caps_predicted_and_discarded_together(client):
    spec = client.RecognitionSpec.retrieve("objects")
    image = ImageInput(ASTRONAUT, encoding="binary")  # two labels pass the objects flow's 0.1: 0.21 and 0.17
    labels = spec.inference(inputs=[image], show_discarded=True, max_predictions=3)["outputs"][0]["labels"]
    assert [e["label_name"] for e in labels["predicted"]] == ["football helmet", "bobsled"]
    assert [e["label_name"] for e in labels["discarded"]] == ["punching bag"]
    assert all(e["score"] >= e["threshold"] for e in labels["predicted"])
    assert all(e["score"] < e["threshold"] for e in labels["discarded"])
    labels = spec.inference(inputs=[image], max_predictions=3)["outputs"][0]["labels"]
    assert (len(labels["predicted"]), labels["discarded"]) == (2, [])
    labels = spec.inference(inputs=[image], show_discarded=True, max_predictions=1)["outputs"][0]["labels"]
    assert (len(labels["predicted"]), labels["discarded"]) == (1, [])
    labels = spec.inference(inputs=[image], show_discarded=True, max_predictions=0)["outputs"][0]["labels"]
    assert labels == {"predicted": [], "discarded": []}


def test_spec_create_list_retrieve_update_replace_delete(client):
    spec = client.RecognitionSpec.create(name="hot-dog", description="lunch", metadata={"line": 3},
                                         outputs=[{"labels": {"roi": "NONE", "exclusive": True, "labels": [
                                             {"id": 0, "name": "hotdog"}, {"id": 1, "name": "not hot-dog"}]}}])
    spec_id = spec["id"]
    assert isinstance(spec_id, int) and spec["current_version_id"] is None and spec["update_date"].endswith("Z")
    assert spec_id in [found.pk for found in client.RecognitionSpec.list()]
    again = client.RecognitionSpec.retrieve(spec_id)
    assert (again["name"], again["description"], again["metadata"]) == ("hot-dog", "lunch", {"line": 3})
    again.update(name="hot dog")
    assert again["name"] == "hot dog" and again["description"] == "lunch"
    again.update(replace=True, name="replaced")
    assert (again["name"], again["description"], again["metadata"]) == ("replaced", "", {})
    assert client.RecognitionSpec.retrieve(spec_id)["name"] == "replaced"
    assert again.delete() is None
    with pytest.raises(ClientError) as refused:
        client.RecognitionSpec.retrieve(spec_id)["name"]
    assert refused.value.status_code == 404


def test_lists_page_with_absolute_next_urls(client, server):
    made = [coffee_spec(client, f"page {n}")["id"] for n in range(5)]
    page = client.RecognitionSpec.list(limit=2)
    assert page.count() >= 5
    assert page["next"].startswith(f"{server.url}/v0.7/recognition/specs/?") and "offset=2" in page["next"]
    assert page["prev"] is None and page["previous"] is None
    assert page.next().prev()["results"] == page["results"]
    listed = [spec.pk for spec in page]  # the client follows `next` until null
    assert set(made) <= set(listed) and len(listed) == len(set(listed)) == page.count()
    for spec_id in made:
        client.RecognitionSpec.retrieve(spec_id).delete()


def test_a_spec_moves_to_another_model_version(client):
    spec = coffee_spec(client)
    first, second = store_version(client, "efficientnet_lite0", "1"), store_version(client, "efficientnet_lite0", "2")
    with pytest.raises(ClientError) as refused:
        spec.inference(inputs=[ImageInput(COFFEE, encoding="binary")])
    assert refused.value.status_code == 400
    assert refused.value.json() == {"error": f"spec {spec['id']} has no current version (current_version_id is "
                                             "null); set it with PATCH to one of GET /v0.7/recognition/versions/"}
    spec.update(current_version_id=first)
    labels = spec.inference(inputs=[ImageInput(COFFEE, encoding="binary")], show_discarded=True)["outputs"][0]
    assert [(e["label_id"], e["label_name"]) for e in labels["labels"]["predicted"]] == [(2, "espresso")]
    assert labels["labels"]["discarded"] == []  # the model's other labels are not the spec's
    spec.update(current_version_id=second)
    assert spec["current_version_id"] == second
    labels = spec.inference(inputs=[ImageInput(COFFEE, encoding="binary")])["outputs"][0]["labels"]
    assert [(e["label_id"], e["label_name"]) for e in labels["predicted"]] == [(1, "ristretto")]
    assert [v.pk for v in spec.versions()] == [second]
    # A version made for the spec, and inference on it directly.
    made = client.RecognitionVersion.create(spec_id=spec["id"], network_id=first, post_processings=[])
    assert (made["spec_id"], made["network_id"], made["model_version"]) == (spec["id"], first, "1")
    assert sorted(v.pk for v in spec.versions()) == sorted([second, made["id"]])
    output = client.RecognitionVersion.retrieve(made["id"]).inference(inputs=[ImageInput(COFFEE, encoding="binary")])
    assert top(output) == ["espresso"]
    # The store's own version runs the model's labels.
    output = client.RecognitionVersion.retrieve(second).inference(inputs=[ImageInput(COFFEE, encoding="binary")])
    assert top(output)[0] == "ristretto"
    spec.delete()
    with pytest.raises(ClientError):
        client.RecognitionVersion.retrieve(made["id"])["id"]  # deleted with its spec


def test_return_task_and_batch_wait(client):
    spec = client.RecognitionSpec.retrieve("objects")
    task = spec.inference(inputs=[ImageInput(COFFEE, encoding="binary")], return_task=True)
    assert task["status"] == "success" and task["error"] is None and isinstance(task.pk, str)
    tasks = [spec.inference(inputs=[ImageInput(image, encoding="binary")], return_task=True, wait_task=False)
             for image in (COFFEE, ASTRONAUT, b"not an image")]
    pending, success, errors = client.Task.batch_wait(tasks=tasks, timeout=30)
    assert pending == [] and [position for position, _ in success] == [0, 1]
    assert top({"outputs": success[0][1]["data"]["outputs"]})[0] == "espresso"
    ((position, failed),) = errors
    assert position == 2 and failed["data"] is None
    assert failed["error"].startswith("inputs[0].image: body is not a supported image")


def test_a_bad_image_fails_its_task_and_the_server_goes_on(client):
    spec = client.RecognitionSpec.retrieve("faces")
    for image, message in ((b"GIF89a not really", "inputs[0].image: body is not a supported image"),
                           (ASTRONAUT[:len(ASTRONAUT) // 2], "inputs[0].image: truncated JPEG: end-of-image "
                                                             "marker missing")):
        with pytest.raises(TaskError) as failed:
            spec.inference(inputs=[ImageInput(image, encoding="binary")])
        task = failed.value.task
        assert task["status"] == "error" and task["error"].startswith(message), task
    assert len(spec.inference(inputs=[ImageInput(ASTRONAUT, encoding="binary")])["outputs"][0]["labels"]
               ["predicted"]) == 1


def test_two_inputs_give_two_outputs(client):
    output = client.RecognitionSpec.retrieve("objects").inference(
        inputs=[ImageInput(COFFEE, encoding="binary"), ImageInput(ASTRONAUT, encoding="binary")], max_predictions=1)
    assert [top({"outputs": [o]}) for o in output["outputs"]] == [["espresso"], ["football helmet"]]


class _Images(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/coffee.jpg":
            self.send_response(200)
            self.send_header("Content-Length", str(len(COFFEE)))
            self.end_headers()
            self.wfile.write(COFFEE)
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


def test_urls_of_an_allowed_host_are_fetched(client):
    images = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        spec = client.RecognitionSpec.retrieve("objects")
        url = f"http://127.0.0.1:{images.server_port}"
        assert top(spec.inference(inputs=[ImageInput(f"{url}/coffee.jpg")]))[0] == "espresso"
        with pytest.raises(TaskError) as failed:
            spec.inference(inputs=[ImageInput(f"{url}/missing.jpg")])
        assert failed.value.task["error"] == "inputs[0].image: the image URL answered HTTP 404"
        with pytest.raises(ClientError) as refused:  # allowed hosts are compared by name: localhost is another
            spec.inference(inputs=[ImageInput(f"http://localhost:{images.server_port}/coffee.jpg")])
        assert refused.value.status_code == 400
    finally:
        images.shutdown()
        images.server_close()


# --- the document's curl lines ----------------------------------------------------------------------------------


def curl(server, path: str, *args: str) -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", f"{server.url}/v0.7{path}",
                           "-H", f"X-API-KEY: {KEY}", *args], capture_output=True, text=True, timeout=30, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


@needs_tool("curl")
def test_the_documents_curl_lines(server, client, tmp_path):
    created = '''{
"name": "My recognition model",
"description": "To recognize various types of birds",
"metadata": {"author": "me", "project": "Birds 101"},
"outputs": [{"labels": {"roi": "NONE", "exclusive": true, "labels": [{"id": 0, "name": "hot-dog"}, {"id": 1, "name": "not hot-dog"}]}}]
}'''
    status, body = curl(server, "/recognition/specs", "-d", created, "-H", "Content-Type: application/json")
    assert status == 201, body
    spec = json.loads(body)
    assert spec["metadata"] == {"author": "me", "project": "Birds 101"} and spec["current_version_id"] is None
    for path in ("/recognition/public", "/recognition/specs", "/recognition/public/faces",
                 f"/recognition/specs/{spec['id']}"):
        status, body = curl(server, path)
        assert status == 200, (path, body)
    image = tmp_path / "img.jpg"
    image.write_bytes(COFFEE)
    # JSON with a data URI whose base64 has the line breaks of `$(cat /tmp/img.jpg | base64)`.
    wrapped = base64.encodebytes(COFFEE).decode()
    status, body = curl(server, "/recognition/public/objects/inference", "-H", "Content-Type: application/json",
                        "-d", f'{{"inputs":[{{"image": {{"source": "data:image/*;base64,{wrapped}"}}}}]}}')
    assert status == 200, body
    assert top(wait_task(server, json.loads(body)["task_id"])["data"])[0] == "espresso"
    status, body = curl(server, "/recognition/public/objects/inference", "-F", f"inputs[0]image.source=@{image}")
    assert status == 200, body
    assert top(wait_task(server, json.loads(body)["task_id"])["data"])[0] == "espresso"
    # The broken one: the shell makes `-d show_discarded="True"` show_discarded=True; curl joins the three -d with &
    # under application/json.
    status, body = curl(server, "/recognition/public/objects/inference",
                        "-d", f'{{"inputs":[{{"image": {{"source": "data:image/*;base64,{wrapped}"}}}}]}}',
                        "-d", "show_discarded=True", "-H", "Content-Type: application/json", "-d", "max_predictions=2")
    assert status == 200, body
    labels = wait_task(server, json.loads(body)["task_id"])["data"]["outputs"][0]["labels"]
    assert len(labels["predicted"]) + len(labels["discarded"]) == 2 and len(labels["discarded"]) == 1
    version = store_version(client, "efficientnet_lite0", "1")
    status, body = curl(server, f"/recognition/specs/{spec['id']}", "-d", "name=new name",
                        "-d", f"current_version_id={version}", "-X", "PATCH")
    assert status == 400, body  # neither "hot-dog" nor "not hot-dog" is an ImageNet label ("hotdog" is)
    assert json.loads(body)["error"].startswith(f"none of spec {spec['id']}'s labels is a label of "
                                                "efficientnet_lite0@1")
    status, body = curl(server, f"/recognition/specs/{spec['id']}", "-d", "name=new name", "-X", "PATCH")
    assert (status, json.loads(body)["name"]) == (200, "new name")
    status, body = curl(server, f"/recognition/specs/{spec['id']}", "-X", "DELETE")
    assert (status, body) == (204, "")
    status, body = curl(server, f"/recognition/specs/{spec['id']}")
    assert status == 404 and json.loads(body) == {"error": f"no recognition spec '{spec['id']}' (private specs have "
                                                           "integer ids; public specs are under "
                                                           "/v0.7/recognition/public/)"}


# --- refusals ---------------------------------------------------------------------------------------------------

DATA_URI = "data:image/jpeg;base64," + base64.b64encode(COFFEE).decode()


def infer(**body) -> tuple[str, str, dict]:
    return "POST", "/recognition/public/objects/inference", {"json": body}


REFUSALS = [
    ("no key", ("GET", "/recognition/public/", {"headers": {}}), 401, "missing API key"),
    ("wrong key", ("GET", "/recognition/specs", {"headers": {"X-API-KEY": "nope"}}), 401, "wrong API key"),
    ("unknown public spec", ("GET", "/recognition/public/fashion-v4/", {}), 404,
     "no public recognition spec 'fashion-v4'; public specs: objects, faces, efficientnet_lite0, face_full"),
    ("capability not installed", ("POST", "/recognition/public/text/inference", {"json": {}}), 404,
     "capability 'text' is not installed on this appliance (project.yaml capabilities:); public specs: objects, "
     "faces, efficientnet_lite0, face_full"),
    ("unknown private spec", ("POST", "/recognition/specs/999999/inference", {"json": {}}), 404,
     "no recognition spec '999999' (private specs have integer ids; public specs are under "
     "/v0.7/recognition/public/)"),
    ("empty inputs", infer(inputs=[]), 400,
     'inputs must be a non-empty list, e.g. [{"image": {"source": "data:image/*;base64,..."}}]'),
    ("no inputs", infer(), 400,
     'inputs must be a non-empty list, e.g. [{"image": {"source": "data:image/*;base64,..."}}]'),
    ("bad bool", infer(inputs=[{"image": {"source": DATA_URI}}], show_discarded="maybe"), 400,
     "show_discarded must be a boolean (true, false, 1 or 0), got 'maybe'"),
    ("negative max_predictions", infer(inputs=[{"image": {"source": DATA_URI}}], max_predictions=-1), 400,
     "max_predictions must be an integer from 0 to 1000, got -1"),
    ("URL source", infer(inputs=[{"image": {"source": "https://static.deepomatic.com/dog2.jpg"}}]), 400,
     "inputs[0].image.source: URL sources are not fetched by the appliance (host static.deepomatic.com is not in "
     "api_settings.deepomatic.url_hosts); send the image itself, as a multipart file part or as "
     "data:image/*;base64,..."),
    ("bad base64", infer(inputs=[{"image": {"source": "data:image/jpeg;base64,@@@"}}]), 400,
     "inputs[0].image.source: the data URI's base64 could not be decoded"),
    ("path source", infer(inputs=[{"image": {"source": "/tmp/img.jpg"}}]), 400,
     "inputs[0].image.source must start with http:, https: or data:image/, or be a multipart file part"),
    ("not JSON", ("POST", "/recognition/public/objects/inference",
                  {"data": b'{"inputs": [', "headers": {**HEADERS, "Content-Type": "application/json"}}), 400,
     "body is not valid JSON: Expecting value at character 12"),
    ("bad outputs", ("POST", "/recognition/specs/", {"json": {"name": "x", "outputs": [{"labels": {
        "roi": "POLYGON", "labels": [{"id": 0, "name": "a"}]}}]}}), 400,
     "outputs[0].labels.roi must be NONE or BBOX, got 'POLYGON'"),
    ("duplicate label", ("POST", "/recognition/specs/", {"json": {"name": "x", "outputs": [{"labels": {
        "roi": "NONE", "labels": [{"id": 0, "name": "a"}, {"id": 0, "name": "b"}]}}]}}), 400,
     "outputs[0].labels.labels[1].id 0 is given twice"),
    ("no name", ("POST", "/recognition/specs/", {"json": {"outputs": []}}), 400, "name is required"),
    ("unknown version", ("GET", "/recognition/versions/424242/", {}), 404,
     "no recognition version '424242'; GET /v0.7/recognition/versions/ lists them"),
    ("unknown task", ("GET", "/tasks/12345/", {}), 404,
     "no task '12345' (tasks are kept for 3600 s, the newest 10000)"),
    ("networks", ("GET", "/networks/", {}), 404, "networks are not served by the appliance: its models come from "
     "the project's model store (GET /v0.7/recognition/versions/ lists them)"),
    ("accounts", ("GET", "/accounts/me/", {}), 404, "accounts are not served by the appliance: its models come "
     "from the project's model store (GET /v0.7/recognition/versions/ lists them)"),
    ("wrong method", ("DELETE", "/recognition/public/objects", {}), 405,
     "method DELETE is not allowed on /v0.7/recognition/public/objects; use GET,HEAD"),
]


@pytest.mark.parametrize(("request_", "status", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_every_refusal_is_a_4xx_with_an_error_key(server, request_, status, message):
    method, path, kwargs = request_
    kwargs = {"headers": HEADERS, **kwargs}
    answer = requests.request(method, f"{server.url}/v0.7{path}", timeout=10, **kwargs)
    assert (answer.status_code, answer.json()) == (status, {"error": message})
    assert answer.headers["Content-Type"].startswith("application/json")
    # And the server goes on serving.
    assert requests.get(f"{server.url}/v0.7/recognition/public", headers=HEADERS, timeout=10).status_code == 200


def test_the_client_sees_a_client_error_at_once(server):
    started = time.monotonic()
    with pytest.raises(ClientError) as refused:
        Client(api_key="wrong", host=server.url).RecognitionSpec.retrieve("objects")["outputs"]
    assert refused.value.status_code == 401 and time.monotonic() - started < 2


def test_both_path_forms_are_served_without_redirects(server):
    for path in ("/recognition/public", "/recognition/public/", "/recognition/versions", "/tasks/"):
        answer = requests.get(f"{server.url}/v0.7{path}", headers=HEADERS, timeout=10, allow_redirects=False)
        assert answer.status_code == 200, path


def test_an_app_id_is_accepted_and_ignored(server):
    answer = requests.get(f"{server.url}/v0.7/recognition/public/faces/", timeout=10,
                          headers={**HEADERS, "X-APP-ID": "123456"})
    assert answer.status_code == 200


def test_a_body_over_the_limit_is_413(tmp_path, serve_in_process):
    project = vision_project(tmp_path, limits={"max_body_bytes": 100_000})
    server = serve_in_process(project)
    answer = requests.post(f"{server.url}/v0.7/recognition/public/faces/inference", headers=HEADERS, timeout=10,
                           files={"inputs[0]image.source": ("a.jpg", b"\xff" * 200_000)})
    assert answer.status_code == 413
    message = answer.json()["error"]
    assert message.startswith("body of 200") and message.endswith(" bytes exceeds max_body_bytes 100000"), message


def test_private_specs_persist_across_restarts(tmp_path):
    project = vision_project(tmp_path)
    first = start_server(project, env=shared_model_cache_env())
    try:
        client = Client(api_key=KEY, host=first.url)
        spec = coffee_spec(client)
        version = store_version(client, "efficientnet_lite0", "2")
        spec.update(current_version_id=version)
    finally:
        first.stop()
    saved = json.loads((project / ".deepomatic" / "specs.json").read_text())
    assert saved["specs"][str(spec["id"])]["current_version_id"] == version
    second = start_server(project, env=shared_model_cache_env())
    try:
        client = Client(api_key=KEY, host=second.url)
        again = client.RecognitionSpec.retrieve(spec["id"])
        assert again.data() == spec.data()
        assert store_version(client, "efficientnet_lite0", "2") == version
        assert coffee_spec(client, "next")["id"] == spec["id"] + 1
    finally:
        second.stop()
