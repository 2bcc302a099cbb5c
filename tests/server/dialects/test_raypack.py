"""The RAYPACK API (issue 10) served in this process on 127.0.0.1 with the real models of flows/vision/: every
curl line of the document through the real curl binary (only the host and the file path changed), real results of
models 1, 2, 5 and Face AI, the anonymisation modes, image URLs from an allowed host, every error with its status
and body, and bad input of every kind while the server keeps serving."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from skimage import data as skdata

from tests.conftest import REPO, needs_tool, start_in_process, write_project

VISION = REPO / "flows" / "vision"
KEY = "meowmeowmeow"
BODY_LIMIT = 3_000_000


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def oranges() -> bytes:
    """Three shaded, dimpled orange balls on a light table (BGR). EfficientNet-lite0 gives orange 0.42 and lemon
    0.39 (measured), so "citrus fruit" about 0.8: ImageNet knows oranges, not drawings of pizza or bananas
    (a drawn pizza gave "wall clock" 0.15 and 2.7 % food)."""
    rng = np.random.default_rng(0)
    image = np.full((400, 400, 3), (230, 225, 220), np.uint8)
    yy, xx = np.mgrid[:400, :400]
    for cx, cy in ((130, 150), (270, 150), (200, 270)):
        cv2.circle(image, (cx, cy), 85, (0, 130, 245), -1)
        dimples = np.zeros(image.shape[:2], np.float32)
        for _ in range(900):
            cv2.circle(dimples, (cx + int(rng.normal(0, 45)), cy + int(rng.normal(0, 45))), 1, 1.0, -1)
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.circle(mask, (cx, cy), 85, 255, -1)
        shade = 1 - 0.5 * np.clip(np.hypot(xx - cx + 30, yy - cy + 30) / 120, 0, 1)
        for channel in range(3):
            image[..., channel] = np.where(mask > 0, np.clip(image[..., channel] * shade - 25 * dimples, 0, 255),
                                           image[..., channel])
        cv2.circle(image, (cx + 5, cy - 80), 6, (30, 90, 60), -1)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".png", cv2.GaussianBlur(image, (3, 3), 0))[1].tobytes()


COFFEE = jpeg(skdata.coffee())
CHELSEA = jpeg(skdata.chelsea())
ASTRONAUT_RGB = skdata.astronaut()
ASTRONAUT = jpeg(ASTRONAUT_RGB)
ORANGES = oranges()
# Where the astronaut's face is (512 x 512 picture): her eyes and mouth, x and y in pixels.
FACE_POINTS = ((200, 105), (245, 105), (222, 150))


class Images(BaseHTTPRequestHandler):
    """A file server on the line's network: the allowed host of `url_hosts`."""

    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/slow.jpg":
            time.sleep(3)
        if self.path == "/moved.jpg":
            self.send_response(302)
            self.send_header("Location", "/astronaut.jpg")
            self.end_headers()
            return
        body = self.files.get(self.path)
        if self.path == "/huge.jpg":
            body = b"\xff\xd8" + bytes(BODY_LIMIT + 10)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def images():
    Images.files = {"/astronaut.jpg": ASTRONAUT, "/coffee.jpg": COFFEE}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def capabilities() -> dict[str, str]:
    """Every RAYPACK capability; identities with its gallery empty (nobody enrolled: model 3 is not installed)."""
    return {name: str(VISION / f"{name}.yaml") for name in ("objects", "food", "faces", "demographics", "identities")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = write_project(tmp_path_factory.mktemp("raypack"), (VISION / "objects.yaml").read_text(),
                           models_dir=str(REPO / "models"), apis=["pekat", "raypack"], api_keys={"doc": KEY},
                           capabilities=capabilities(), limits={"max_body_bytes": BODY_LIMIT},
                           api_settings={"raypack": {"url_hosts": ["127.0.0.1"], "url_timeout_s": 1.0}})
    server = start_in_process(folder, log_level="INFO")
    yield server
    server.stop()


# An identities flow whose distances the test chooses: a Code hook that reports faces as identify@1 reports them
# (`identity`, `distance` of the descriptors), so the value formula is checked exactly. tests/server/
# test_vision_api.py runs the real identify@1 through every API.
CELEBRITY_HOOK = """
def main(context):
    context["faces"] = [
        {"node": "who", "box": [10, 20, 100, 120], "score": 0.97, "identity": "Ada Lovelace", "distance": 0.3},
        {"node": "who", "box": [200, 20, 90, 110], "score": 0.93, "identity": None, "distance": None},
        {"node": "who", "box": [300, 20, 90, 110], "score": 0.91, "identity": "Grace Hopper", "distance": 0.55}]
"""


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """No key, the objects capability and a stand-in identities flow, a queue of one."""
    folder = write_project(tmp_path_factory.mktemp("raypack-bare"), (VISION / "objects.yaml").read_text(),
                           models_dir=str(REPO / "models"), apis=["raypack"], limits={"queue_depth": 1},
                           hooks={"celebrity": CELEBRITY_HOOK},
                           capabilities={"objects": str(VISION / "objects.yaml"),
                                         "identities": {"nodes": {"who": {"type": "code@1", "module": "celebrity"}}}})
    server = start_in_process(folder, log_level="INFO")
    yield server
    server.stop()


def recog(url: str, image: bytes | None = COFFEE, filename: str = "coffee.jpg", key: str | None = KEY,
          **fields) -> requests.Response:
    form = {"apikey": key, **fields} if key is not None else fields
    files = {"file": (filename, image, "image/jpeg")} if image is not None else None
    return requests.post(f"{url}/recog", data=form, files=files, timeout=60)


def face(url: str, image: bytes | None = ASTRONAUT, key: str | None = KEY, **fields) -> requests.Response:
    form = {"apikey": key, **fields} if key is not None else fields
    files = {"imagef": ("astronaut.jpg", image, "image/jpeg")} if image is not None else None
    return requests.post(f"{url}/raypackfacev3", data=form, files=files, timeout=60)


def tags(response: requests.Response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    return {tag["name"]: float(tag["value"]) for tag in response.json()["results"]["tags"]}


def error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"error": {"code": status, "message": message}}


def curl(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-s", "-S", *arguments], capture_output=True, timeout=60)


def decoded(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/jpeg"
    return cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)


# --- the document's curl lines -------------------------------------------------------------------------------

@needs_tool("curl")
def test_document_recog_line_answers_the_container_exactly(server, tmp_path):
    path = tmp_path / "richard-clark-1177371-unsplash.jpg"
    path.write_bytes(COFFEE)
    done = curl("-X", "POST", "-F", "apikey=meowmeowmeow", "-F", "threshold=1.0", "-F", f"file=@{path}",
                "-F", "model=1", "-F", "lang=de", f"{server.url}/recog")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert list(answer) == ["name", "version", "license", "results"]
    assert (answer["name"], answer["version"], answer["license"]) == ("Raypack_AI_Filecontainer", "1.0",
                                                                      "on-premise")
    stats = answer["results"]["stats"]
    assert list(stats) == ["modelname", "modelid", "originalfile", "starttime", "endtime", "duration"]
    assert (stats["modelname"], stats["modelid"]) == ("Raypack_General", "1")
    assert stats["originalfile"] == "richard-clark-1177371-unsplash.jpg"
    assert isinstance(stats["starttime"], int) and isinstance(stats["endtime"], int)
    assert abs(stats["starttime"] / 1000 - time.time()) < 60
    assert stats["duration"] == round((stats["endtime"] - stats["starttime"]) / 1000, 3)
    # threshold=1.0: only tags whose value shows as 1.00000000 (the model is sure of nothing that much here).
    assert all(tag["value"] == "1.00000000" for tag in answer["results"]["tags"])


@needs_tool("curl")
def test_document_authentication_fragment_reaches_the_api_and_asks_for_the_model(server):
    done = curl("-X", "POST", "-F", "apikey=meowmeowmeow", f"{server.url}/recog")
    assert json.loads(done.stdout) == {"error": {"code": 400, "message": "missing field model: 1 (general objects), "
                                                 "2 (food), 3 (celebrities) or 5 (demographics)"}}


@needs_tool("curl")
@pytest.mark.parametrize("field", ["apikey: meowmeowmeow", "meowmeowmeow"])
def test_document_key_forms_without_equals_are_refused_by_curl_itself(server, field):
    """`-F "apikey: meowmeowmeow"` (Authentication) and `-F "meowmeowmeow"` (Face AI) are not field syntax:
    curl 7.88 prints "Illegally formatted input field" and exits 2 without sending anything."""
    done = curl("-X", "POST", "-F", field, "-F", "threshold=0.9", "-F", "mode=json", f"{server.url}/raypackfacev3")
    assert done.returncode == 2
    assert b"Illegally formatted input field" in done.stderr or b"badly used" in done.stderr
    assert done.stdout == b""
    # What the client should have sent instead: the key as a field; without it the answer says how.
    error(face(server.url, key=None, mode="json"), 401,
          'missing API key: send the form field apikey, e.g. curl -F "apikey=<key>" (the form -F "apikey: <key>" '
          "is not valid curl syntax: curl refuses it and sends nothing)")


@needs_tool("curl")
def test_document_face_line_with_an_internet_url_is_refused_clearly(server):
    done = curl("-X", "POST", "-F", "apikey=meowmeowmeow", "-F", "threshold=0.9",
                "-F", "imagef=https://cvdazzle.com/assets/img/look5r-md.jpg", "-F", "mode=json",
                "-F", "facemode=default", "-F", "hex=00ff00", f"{server.url}/raypackfacev3")
    assert json.loads(done.stdout) == {"error": {"code": 400, "message": (
        "image URLs are not fetched from cvdazzle.com: the appliance has no internet access; upload the image "
        "(-F file=@image.jpg), or add the host to api_settings.raypack.url_hosts")}}


@needs_tool("curl")
def test_document_face_line_with_a_line_url_answers_the_face_in_pixels(server, images):
    done = curl("-X", "POST", "-F", "apikey=meowmeowmeow", "-F", "threshold=0.9",
                "-F", f"imagef={images}/astronaut.jpg", "-F", "mode=json", "-F", "facemode=default",
                "-F", "hex=00ff00", f"{server.url}/raypackfacev3")
    answer = json.loads(done.stdout)
    assert list(answer) == ["totalfaces", "time", "faces"]
    assert answer["totalfaces"] == 1 and 0 < answer["time"] < 5
    (found,) = answer["faces"]
    assert list(found) == ["xpos", "ypos", "width", "height", "score"]
    assert all(isinstance(found[key], int) for key in ("xpos", "ypos", "width", "height"))
    for x, y in FACE_POINTS:
        assert found["xpos"] < x < found["xpos"] + found["width"] and found["ypos"] < y < found["ypos"] + found["height"]
    assert 80 < found["width"] < 200 and 80 < found["height"] < 200 and 0.9 <= found["score"] <= 1


@needs_tool("curl")
def test_document_demographics_line(server, images):
    line = ["-X", "POST", "-F", "apikey=meowmeowmeow", "-F", "threshold=0.2", "-F", "url=URL", "-F", "model=5",
            "-F", "lang=de", f"{server.url}/recog"]
    internet = "https://www.br.de/fernsehen/das-erste/sendungen/report-muenchen/videos-und-manuskripte/kuenstliche-intelligenz-126~_v-img__16__9__xl_-d31c35f8186ebeb80b0cd843a7c267a0e0c81647.jpg"  # noqa: E501
    done = curl(*[part.replace("URL", internet) for part in line])
    assert json.loads(done.stdout)["error"]["code"] == 400
    done = curl(*[part.replace("URL", f"{images}/astronaut.jpg") for part in line])
    answer = json.loads(done.stdout)
    assert answer["results"]["stats"]["originalfile"] == f"{images}/astronaut.jpg"
    assert answer["results"]["stats"]["modelname"] == "Raypack_Demographics"
    names = [tag["name"] for tag in answer["results"]["tags"]]
    assert names[0] == "weiblich" and float(answer["results"]["tags"][0]["value"]) > 0.8
    assert len(names) == 2 and names[1].startswith("Alter:") and 20 <= int(names[1].split(":")[1]) <= 60


# --- real results ---------------------------------------------------------------------------------------------

def test_food_on_coffee_is_espresso_coffee_and_a_drink(server):
    found = tags(recog(server.url, model="2", lang="en", threshold="0.5"))
    assert list(found)[:1] in (["drink"], ["espresso"])
    assert found["espresso"] > 0.9 and found["coffee"] == found["espresso"] and found["drink"] >= found["espresso"]
    assert set(found) == {"espresso", "coffee", "drink"}


def test_food_in_german_uses_the_map(server):
    found = tags(recog(server.url, model="2", threshold="0.5"))  # lang defaults to de
    assert set(found) == {"Espresso", "Kaffee", "Getränk"}


def test_food_parent_tags_sum_their_classes(server):
    found = tags(recog(server.url, image=ORANGES, filename="oranges.png", model="2", lang="en", threshold="0.2"))
    assert found["orange"] > 0.3 and found["lemon"] > 0.3
    assert found["citrus fruit"] == pytest.approx(found["orange"] + found["lemon"], abs=2e-8)
    assert found["fruit"] >= found["citrus fruit"] and found["food"] >= found["fruit"]
    assert "drink" not in found


def test_food_on_a_cat_finds_no_food(server):
    assert tags(recog(server.url, image=CHELSEA, model="2", lang="en", threshold="0.05")) == {}


def test_threshold_is_honoured(server):
    assert tags(recog(server.url, model="2", lang="en", threshold="0.99")) == {}
    everything = tags(recog(server.url, model="2", lang="en", threshold="0"))
    assert len(everything) == 46 + 25 and min(everything.values()) >= 0
    default = tags(recog(server.url, model="2", lang="en"))  # 0.9
    assert all(value >= 0.9 for value in default.values()) and "espresso" in default


def test_general_model_on_chelsea_is_a_cat(server):
    found = tags(recog(server.url, image=CHELSEA, filename="chelsea.jpg", model="1", lang="en", threshold="0.1"))
    assert set(found) & {"tabby", "tiger cat", "Egyptian cat"}
    assert list(found.values()) == sorted(found.values(), reverse=True)
    # The cat classes share the probability: none reaches the default threshold 0.9.
    assert tags(recog(server.url, image=CHELSEA, model="1")) == {}
    # German: ImageNet's other labels have no German names and stay English (docs/apis.md).
    assert set(tags(recog(server.url, image=CHELSEA, model="1", lang="de", threshold="0.1"))) == set(found)


def test_demographics_tags_in_english(server):
    response = recog(server.url, image=ASTRONAUT, model="5", lang="en", threshold="0.5")
    found = response.json()["results"]["tags"]
    assert [tag["name"] for tag in found][0] == "female" and found[1]["name"].startswith("age:")
    # The face's detection score (0.91) is the age tag's value: over 0.95 the face is not reported at all.
    assert tags(recog(server.url, image=ASTRONAUT, model="5", lang="en", threshold="0.95")) == {}


def test_getmodels_lists_what_is_installed(server, bare):
    response = requests.post(f"{server.url}/getmodels", data={"apikey": KEY}, timeout=10)
    assert response.status_code == 200
    listed = response.json()["response"]
    # celeb_us is not listed: its flow's gallery is empty.
    expected = [("general", "1"), ("food", "2"), ("raypackfacev3", "4"), ("demographics", "5")]
    assert [(entry["name"], entry["id"]) for entry in listed] == expected
    assert all(list(entry) == ["name", "id", "desc", "parameters", "pricing"] for entry in listed)
    assert {entry["pricing"] for entry in listed} == {"on-premise"}
    bare_list = requests.post(f"{bare.url}/getmodels", timeout=10).json()["response"]
    assert [entry["id"] for entry in bare_list] == ["1", "3"]


# --- Face AI images -------------------------------------------------------------------------------------------

def face_box(url: str) -> tuple[int, int, int, int]:
    (found,) = face(url, mode="json").json()["faces"]
    return found["xpos"], found["ypos"], found["width"], found["height"]


def test_face_threshold_is_honoured(server):
    assert face(server.url, mode="json", threshold="0.95").json()["totalfaces"] == 0
    assert face(server.url, mode="json", threshold="0.5").json()["totalfaces"] == 1


def test_face_image_modes_change_the_face_as_named(server):
    x, y, w, h = face_box(server.url)
    original = cv2.cvtColor(ASTRONAUT_RGB, cv2.COLOR_RGB2BGR).astype(int)
    inside = (slice(y + 4, y + h - 4), slice(x + 4, x + w - 4))
    outside_mask = np.ones(original.shape[:2], bool)
    outside_mask[max(0, y - 4):y + h + 4, max(0, x - 4):x + w + 4] = False

    default = decoded(face(server.url)).astype(int)  # mode=image and facemode=default: a green box
    assert np.abs(default[y + h // 2, x] - (0, 255, 0)).max() < 60
    assert np.abs(default[inside] - original[inside]).mean() < 4
    assert np.abs(default[outside_mask] - original[outside_mask]).mean() < 4

    pixel = decoded(face(server.url, facemode="pixel")).astype(int)
    assert np.abs(pixel[inside] - original[inside]).mean() > 8
    assert np.abs(pixel[outside_mask] - original[outside_mask]).mean() < 4

    fill = decoded(face(server.url, facemode="fill", hex="ff0000")).astype(int)
    assert np.abs(fill[inside].mean(axis=(0, 1)) - (0, 0, 255)).max() < 8  # BGR: red
    assert np.abs(fill[outside_mask] - original[outside_mask]).mean() < 4

    black = decoded(face(server.url, facemode="black")).astype(int)
    assert black[outside_mask].mean() < 3
    assert np.abs(black[inside] - original[inside]).mean() < 4


def test_face_jsonimage_has_the_json_and_the_jpeg(server):
    answer = face(server.url, mode="jsonimage", facemode="pixel").json()
    assert answer["totalfaces"] == 1 and list(answer) == ["totalfaces", "time", "faces", "image"]
    image = cv2.imdecode(np.frombuffer(base64.b64decode(answer["image"]), np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (512, 512, 3)


# --- URLs ----------------------------------------------------------------------------------------------------

def test_url_fetched_from_an_allowed_host(server, images):
    response = requests.post(f"{server.url}/recog", data={"apikey": KEY, "model": "2", "url": f"{images}/coffee.jpg",
                                                          "threshold": "0.5", "lang": "en"}, timeout=30)
    assert "espresso" in tags(response)
    assert response.json()["results"]["stats"]["originalfile"] == f"{images}/coffee.jpg"


@pytest.mark.parametrize("path, status, message", [
    ("/missing.jpg", 502, "the image URL answered HTTP 404"),
    ("/moved.jpg", 502, "the image URL answered HTTP 302"),
    ("/slow.jpg", 504, "the image URL did not answer within 1 s"),
    ("/huge.jpg", 413, f"the image URL's body of {BODY_LIMIT + 12} bytes exceeds max_body_bytes {BODY_LIMIT}"),
])
def test_url_failures(server, images, path, status, message):
    error(requests.post(f"{server.url}/recog", data={"apikey": KEY, "model": "1", "url": images + path}, timeout=30),
          status, message)


def test_url_nobody_listens(server):
    error(requests.post(f"{server.url}/recog", data={"apikey": KEY, "model": "1", "url": "http://127.0.0.1:9/a.jpg"},
                        timeout=30), 502, "the image URL could not be fetched (ClientConnectorError)")


# --- errors and bad input ------------------------------------------------------------------------------------

MISSING_KEY = ('missing API key: send the form field apikey, e.g. curl -F "apikey=<key>" (the form '
               '-F "apikey: <key>" is not valid curl syntax: curl refuses it and sends nothing)')


@pytest.mark.parametrize("fields, status, message", [
    ({"key": None, "model": "1"}, 401, MISSING_KEY),
    ({"key": "meow", "model": "1"}, 401, "wrong API key"),
    ({"key": ""}, 401, "wrong API key"),
    ({}, 400, "missing field model: 1 (general objects), 2 (food), 3 (celebrities) or 5 (demographics)"),
    ({"model": "7"}, 400, "unknown model '7': 1 (general objects), 2 (food), 3 (celebrities) or 5 (demographics)"),
    ({"model": "4"}, 400, "model 4 is Face AI: POST /raypackfacev3 with the field imagef"),
    ({"model": "1", "threshold": "abc"}, 400, "threshold must be a number from 0 to 1, got 'abc'"),
    ({"model": "1", "threshold": "1.5"}, 400, "threshold must be from 0 to 1, got 1.5"),
    ({"model": "1", "threshold": "nan"}, 400, "threshold must be from 0 to 1, got nan"),
    ({"model": "1", "lang": "fr"}, 400, "lang must be de or en, got 'fr'"),
    ({"model": "1", "image": None}, 400, "missing image: send -F file=@image.jpg or -F url=http://..."),
    ({"model": "1", "image": b""}, 400, "the uploaded file is empty"),
    ({"model": "1", "image": b"GIF89a not a jpeg at all" * 10}, 415, None),
    ({"model": "1", "image": COFFEE[:5000]}, 400, "truncated JPEG: end-of-image marker missing"),
])
def test_recog_errors(server, fields, status, message):
    fields = dict(fields)
    key = fields.pop("key", KEY)
    image = fields.pop("image", COFFEE)
    response = recog(server.url, image=image, key=key, **fields)
    if message is None:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"code", "message"}
    else:
        error(response, status, message)


def test_not_installed_models(server, bare):
    error(recog(server.url, model="3"), 404, "model 3 (celeb_us) is not installed on this appliance; installed: "
          "1 (general), 2 (food), 4 (raypackfacev3), 5 (demographics)")
    error(recog(bare.url, key=None, model="2"), 404,
          "model 2 (food) is not installed on this appliance; installed: 1 (general), 3 (celeb_us)")
    error(face(bare.url, key=None), 404,
          "Face AI (model 4, raypackfacev3) is not installed on this appliance; installed: 1 (general), 3 (celeb_us)")


def test_celebrities_are_the_recognised_people_with_their_similarity(bare):
    response = recog(bare.url, image=ASTRONAUT, key=None, model="3", threshold="0.5")
    assert response.json()["results"]["stats"]["modelname"] == "Raypack_Celeb_US"
    # value = 1 - distance / 1.2: 0.75 for Ada Lovelace; Grace Hopper's 0.5417 passes 0.5, not 0.6.
    assert response.json()["results"]["tags"] == [{"name": "Ada Lovelace", "value": "0.75000000"},
                                                  {"name": "Grace Hopper", "value": "0.54166667"}]
    assert tags(recog(bare.url, image=ASTRONAUT, key=None, model="3", threshold="0.6")) == {"Ada Lovelace": 0.75}


@pytest.mark.parametrize("fields, message", [
    ({"mode": "xml"}, "mode must be image or json or jsonimage, got 'xml'"),
    ({"facemode": "blur"}, "facemode must be default or pixel or fill or black, got 'blur'"),
    ({"hex": "green"}, "hex must be a colour as 6 hexadecimal digits rrggbb (e.g. 00ff00), got 'green'"),
    ({"threshold": "-1"}, "threshold must be from 0 to 1, got -1"),
])
def test_face_errors(server, fields, message):
    error(face(server.url, **fields), 400, message)


def test_face_imagef_as_text_that_is_no_url(server):
    response = requests.post(f"{server.url}/raypackfacev3", data={"apikey": KEY, "imagef": "/home/me/a.jpg"},
                             timeout=10)
    error(response, 400, "imagef is text but not an http(s) URL: upload the file with -F imagef=@path")


def test_not_a_form_and_wrong_methods_and_paths(server):
    error(requests.post(f"{server.url}/recog", json={"apikey": KEY, "model": "1"}, timeout=10), 415,
          "body of type application/json is not a form; send multipart/form-data (curl -F) or "
          "application/x-www-form-urlencoded (curl -d)")
    response = requests.get(f"{server.url}/recog", timeout=10)
    error(response, 405, "method GET is not allowed on /recog; use POST")
    error(requests.post(f"{server.url}/recog/v2", timeout=10), 404,
          "no endpoint at /recog/v2; endpoints: /getmodels, /raypackfacev3, /recog")
    error(requests.post(f"{server.url}/getmodels", data={"apikey": "nope"}, timeout=10), 401, "wrong API key")


def test_key_as_header_and_urlencoded_form(server):
    response = requests.post(f"{server.url}/recog", headers={"apikey": KEY},
                             files={"file": ("c.jpg", COFFEE)}, data={"model": "2", "lang": "en", "threshold": "0.5"},
                             timeout=30)
    assert "espresso" in tags(response)
    error(requests.post(f"{server.url}/recog", data={"apikey": KEY, "model": "2"}, headers={"apikey": "other"},
                        timeout=10), 401, "wrong API key")


def test_too_large_upload(server):
    response = recog(server.url, image=b"\xff\xd8" + bytes(BODY_LIMIT), model="1")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413


def test_busy_is_503_in_the_raypack_shape(bare):
    big = jpeg(np.random.default_rng(1).integers(0, 255, (2500, 2500, 3), dtype=np.uint8))

    def send(_: int) -> requests.Response:
        return requests.post(f"{bare.url}/recog", data={"model": "1"}, files={"file": ("n.jpg", big)}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(12)))
    busy = [answer for answer in answers if answer.status_code == 503]
    assert busy, [answer.status_code for answer in answers]
    assert busy[0].json()["error"]["code"] == 503 and "Retry-After" in busy[0].headers
    assert {answer.status_code for answer in answers} <= {200, 503}


def test_bad_input_leaves_the_server_serving(server):
    junk = [b"", b"\x00" * 1000, b"\xff\xd8\xff" + bytes(100), b"\x89PNG\r\n\x1a\n" + bytes(50), b"%PDF-1.4"]
    for body in junk:
        requests.post(f"{server.url}/recog", data=body, headers={"Content-Type": "multipart/form-data; boundary=x"},
                      timeout=10)
        requests.post(f"{server.url}/raypackfacev3", data={"apikey": KEY}, files={"imagef": body}, timeout=10)
    assert "espresso" in tags(recog(server.url, model="2", lang="en", threshold="0.5"))
    assert server.serving()


def test_no_key_project_needs_none(bare):
    found = tags(recog(bare.url, image=CHELSEA, key=None, model="1", lang="en", threshold="0.1"))
    assert set(found) & {"tabby", "tiger cat", "Egyptian cat"}


def test_answers_go_through_the_real_file_path(server, tmp_path: Path):
    """-F file=@path with a path containing spaces, as a user's desktop folder has."""
    path = tmp_path / "API Doku" / "Bilder"
    path.mkdir(parents=True)
    (path / "kaffee.jpg").write_bytes(COFFEE)
    done = curl("-X", "POST", "-F", "apikey=meowmeowmeow", "-F", "threshold=0.5", "-F",
                f"file=@{path / 'kaffee.jpg'}", "-F", "model=2", "-F", "lang=de", f"{server.url}/recog")
    answer = json.loads(done.stdout)
    assert answer["results"]["stats"]["originalfile"] == "kaffee.jpg"
    assert {tag["name"] for tag in answer["results"]["tags"]} == {"Espresso", "Kaffee", "Getränk"}
