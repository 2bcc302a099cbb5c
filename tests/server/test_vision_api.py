"""projects/vision-api as its users meet it: every API on one port answering from the same flows and models, the
same real frame through each, and the face gallery (identities) that is "not installed" in every API until someone
is enrolled over HTTP, then names the person in every API."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
import requests
import yaml
from skimage import data as skdata

from tests.conftest import REPO, InProcessServer, start_in_process

KEY = "vision-key"
COFFEE = cv2.imencode(".jpg", cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR))[1].tobytes()
ASTRONAUT = cv2.imencode(".jpg", cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """The demo project as shipped, copied so that its gallery and state files land in a tmp folder; served in
    this process (every request here is handler logic)."""
    source = REPO / "projects" / "vision-api"
    folder = tmp_path_factory.mktemp("vision") / "vision-api"
    folder.mkdir()
    config = yaml.safe_load((source / "project.yaml").read_text())
    config["flow"] = str((source / config["flow"]).resolve())
    config["models_dir"] = str((source / config["models_dir"]).resolve())
    config["capabilities"] = {name: str((source / path).resolve()) for name, path in config["capabilities"].items()}
    (folder / "project.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("VISION_API_KEY", KEY)
        started = start_in_process(folder)
        yield started
        started.stop()
    shutil.rmtree(folder, ignore_errors=True)


def ask(server: InProcessServer, api: str, image: bytes, capability: str) -> requests.Response:
    """One request the way each API's clients send it."""
    url = server.url
    if api == "pekat":
        return requests.post(f"{url}/analyze_image", data=image, headers={"X-API-Key": KEY}, timeout=30)
    if api == "raypack":
        model = {"objects": "1", "identities": "3"}[capability]
        return requests.post(f"{url}/recog", data={"apikey": KEY, "model": model, "threshold": "0.3", "lang": "en"},
                             files={"file": ("part.jpg", image)}, timeout=30)
    if api == "imagerecognize":
        kind = {"objects": "objects", "identities": "celebrities"}[capability]
        return requests.post(f"{url}/api/v2/", data={"apikey": KEY, "type": kind}, files={"file": image}, timeout=30)
    headers = {"X-API-KEY": KEY}
    submitted = requests.post(f"{url}/v0.7/recognition/public/{capability}/inference", headers=headers,
                              files={"inputs[0]image.source": ("inputs[0]image.source", image)}, timeout=30)
    if submitted.status_code != 200:
        return submitted
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        task = requests.get(f"{url}/v0.7/tasks/{submitted.json()['task_id']}/", headers=headers, timeout=30)
        if task.json()["status"] != "pending":
            return task
    raise AssertionError("the Deepomatic task stayed pending for 30 s")


def names(api: str, response: requests.Response) -> list[str]:
    """The label names of an answer, in that API's shape."""
    assert response.status_code == 200, response.text
    body = json.loads(response.text)
    if api == "pekat":
        return [entry["label"] for entry in body["classNames"]]
    if api == "raypack":
        return [tag["name"] for tag in body["results"]["tags"]]
    if api == "imagerecognize":
        return [entry["name"] for entry in body["data"]["objects"]]
    assert body["status"] == "success", body
    return [entry["label_name"] for entry in body["data"]["outputs"][0]["labels"]["predicted"]]


@pytest.mark.parametrize("api", ["pekat", "raypack", "imagerecognize", "deepomatic"])
def test_every_api_names_the_espresso_in_the_same_frame(server, api):
    assert "espresso" in names(api, ask(server, api, COFFEE, "objects"))


def test_identities_are_not_installed_in_any_api_until_someone_is_enrolled_over_http(server):
    not_installed = {
        "raypack": (404, lambda body: "model 3 (celeb_us) is not installed" in body["error"]["message"]),
        "imagerecognize": (420, lambda body: body["status_message"].startswith(
            "Invalid type: 'celebrities' is not installed on this appliance: nobody is enrolled in")),
        "deepomatic": (404, lambda body: body["error"].startswith(
            "capability 'identities' cannot answer on this appliance: nobody is enrolled in")),
    }
    for api, (status, says) in not_installed.items():
        response = ask(server, api, ASTRONAUT, "identities")
        assert response.status_code == status and says(json.loads(response.text)), (api, response.text)

    enrol = f"{server.url}/faces/enrol?name=Eileen%20Collins"
    refused = requests.post(enrol, data=ASTRONAUT, headers={"X-API-Key": "wrong"}, timeout=30)
    assert (refused.status_code, refused.json()["message"]) == (401, "wrong API key")
    no_face = requests.post(enrol, data=COFFEE, headers={"X-API-Key": KEY}, timeout=60)
    assert (no_face.status_code, no_face.json()["message"]) == (400, "image 1: no face found")
    enrolled = requests.post(enrol, data=ASTRONAUT, headers={"X-API-Key": KEY}, timeout=60)
    assert enrolled.status_code == 200, enrolled.text
    assert enrolled.json()["data"] == {"name": "Eileen Collins", "descriptors": 1}

    # The same person, smaller and shifted: a new picture of her, not the enrolled one.
    picture = cv2.imdecode(np.frombuffer(ASTRONAUT, np.uint8), cv2.IMREAD_COLOR)
    moved = cv2.copyMakeBorder(cv2.resize(picture, (400, 400)), 40, 0, 60, 0, cv2.BORDER_CONSTANT)
    again = cv2.imencode(".jpg", moved)[1].tobytes()
    for api in ("raypack", "imagerecognize", "deepomatic"):
        assert "Eileen Collins" in names(api, ask(server, api, again, "identities")), api
