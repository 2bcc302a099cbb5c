"""The imagerecognize.com API (issue 10) on 127.0.0.1 with the real models of flows/vision/: the document's Python
example as written, curl, every documented error with its exact body and HTTP status, real results and the cache
from the application served in this process; the quota persisted across a restart of `appliance serve`."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import textwrap
from datetime import date, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from skimage import data as skdata

from appliance.server.dialects import imagerecognize
from appliance.server.dialects.imagerecognize import accounts
from tests.conftest import (
    REPO,
    needs_tool,
    shared_model_cache_env,
    start_in_process,
    start_server,
    write_project,
)

VISION = REPO / "flows" / "vision"
KEYS = {"example": "YOUR-API-KEY", "line": "line-key", "mes": "mes-key", "tiny": "tiny-key"}


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def text_png(text: str = "LOT 2024") -> bytes:
    image = np.full((300, 900, 3), 255, np.uint8)
    cv2.putText(image, text, (40, 200), cv2.FONT_HERSHEY_SIMPLEX, 4, (0, 0, 0), 10)
    return cv2.imencode(".png", image)[1].tobytes()


COFFEE = jpeg(skdata.coffee())
ASTRONAUT = jpeg(skdata.astronaut())


def vision_project(folder: Path, **settings) -> Path:
    return write_project(folder, (VISION / "objects.yaml").read_text(), models_dir=str(REPO / "models"),
                         apis=["pekat", "imagerecognize"], **settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = vision_project(
        tmp_path_factory.mktemp("imagerecognize"), api_keys=KEYS,
        capabilities={"objects": str(VISION / "objects.yaml"), "faces": str(VISION / "faces.yaml"),
                      "text": str(VISION / "text.yaml"), "nsfw": str(REPO / "flows" / "nsfw.yaml")},
        api_settings={"imagerecognize": {"quotas": {"tiny": 2, "mes": 1000}, "cache_size": 3}},
        limits={"body_read_timeout_s": 2})
    server = start_in_process(folder, log_level="INFO")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def url(server) -> str:
    return f"{server.url}/api/v2/"


def post(url: str, key: str | None = "line-key", kind: str | None = "objects", image: bytes | None = COFFEE,
         **fields) -> requests.Response:
    form = {name: value for name, value in (("apikey", key), ("type", kind)) if value is not None}
    files = {"file": image} if image is not None else None
    return requests.post(url, data={**form, **fields}, files=files, timeout=60, allow_redirects=False)


def error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    expected = {"status": status, "status_message": message, "data": None}
    assert json.loads(response.text) == expected
    assert response.text == json.dumps(expected, separators=(",", ":")).replace(">", "\\u003e")


def objects(response: requests.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    body = json.loads(response.text)
    assert body["status"] == 200 and body["message"] == "Success"
    assert body["data"]["error"] == 0
    return body["data"]["objects"]


# -- the document's examples ------------------------------------------------------------------------------------

def test_the_documents_python_example_runs_as_written_with_our_host(url, tmp_path):
    (tmp_path / "image.jpg").write_bytes(COFFEE)
    example = textwrap.dedent(f"""\
        import requests
        import json

        API_ENDPOINT = "{url}"
        API_KEY = "YOUR-API-KEY"

        with open('image.jpg', 'rb') as f1:
            f = {{'file': f1.read()}}

        d = {{'apikey': API_KEY,
             'type': 'objects',
             'max_labels': 10,
             'min_confidence': 80}}

        r = requests.post(url=API_ENDPOINT, data=d, files=f)

        print(r.text)
        print(json.loads(r.text))
        """)
    (tmp_path / "example.py").write_text(example)
    run = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout.splitlines()[0])
    assert body["data"]["type"] == "objects"
    assert [entry["name"] for entry in body["data"]["objects"]] == ["espresso"]
    assert run.stdout.splitlines()[1].startswith("{'status': 200, 'message': 'Success', 'data': {'error': 0")


@needs_tool("curl")
def test_curl_with_the_documents_fields(url, tmp_path):
    (tmp_path / "image.jpg").write_bytes(COFFEE)
    run = subprocess.run(["curl", "-sS", "-F", "apikey=line-key", "-F", "type=objects", "-F", "max_labels=10",
                          "-F", "min_confidence=80", "-F", "file=@image.jpg", url, "-w", "\n%{http_code} %{content_type}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    body, status = run.stdout.rsplit("\n", 1)
    assert status == "200 text/html; charset=UTF-8"
    (espresso,) = json.loads(body)["data"]["objects"]
    assert espresso["name"] == "espresso" and 80 <= espresso["confidence"] <= 100


@pytest.mark.parametrize("path", ["/api/v2", "/api/v2/", "/api/v3", "/api/v3/"])
def test_every_version_path_answers_without_a_redirect(server, path):
    response = post(server.url + path)
    assert response.history == [] and "Location" not in response.headers
    assert objects(response)[0]["name"] == "espresso"
    cached = requests.get(server.url + path, params={"apikey": "line-key", "type": "cache"}, allow_redirects=False)
    assert cached.status_code == 200 and cached.history == []


def test_answers_are_json_sent_as_text_html_as_the_jquery_example_needs(url):
    for response in (post(url), post(url, key=None)):
        assert response.headers["Content-Type"] == "text/html; charset=UTF-8"
        json.loads(response.text)


def test_markup_in_results_is_escaped_in_the_html_typed_body():
    body = imagerecognize._json({"name": "<img src=x onerror=alert(1)> & co"})
    assert b"<" not in body and b">" not in body and b"&" not in body
    assert json.loads(body) == {"name": "<img src=x onerror=alert(1)> & co"}


# -- real results ----------------------------------------------------------------------------------------------

def test_objects_are_imagenet_labels_with_confidence_in_percent(url):
    found = objects(post(url))
    assert found[0]["name"] == "espresso" and 50 < found[0]["confidence"] <= 100
    assert all(entry["coordinates"] == [] for entry in found)  # a classifier: labels without places


def test_max_labels_and_min_confidence_are_honoured(url):
    three = objects(post(url, max_labels=3, min_confidence=0))
    assert len(three) == 3
    assert [e["confidence"] for e in three] == sorted((e["confidence"] for e in three), reverse=True)
    assert len(objects(post(url, max_labels=1, min_confidence=0))) == 1
    low = objects(post(url, max_labels=50, min_confidence=0.5))  # decimals are accepted
    assert len(low) > 1 and all(e["confidence"] >= 0.5 for e in low)
    assert objects(post(url, max_labels=10, min_confidence=99)) == []  # espresso is about 95


def test_detect_faces_finds_the_astronauts_face_in_fractions_of_the_image(url):
    (face,) = objects(post(url, kind="detect_faces", image=ASTRONAUT))
    assert face["name"] == "Face" and 50 < face["confidence"] <= 100
    (place,) = face["coordinates"]
    # Her face in the 512x512 picture: about x 165..290, y 55..185 pixels.
    assert 0.25 < place["x"] < 0.38 and 0.05 < place["y"] < 0.18
    assert 0.15 < place["width"] < 0.35 and 0.15 < place["height"] < 0.35


def test_detect_text_reads_printed_text_line_by_line(url):
    found = objects(post(url, kind="detect_text", image=text_png()))
    assert " ".join(entry["name"] for entry in found) == "LOT 2024"
    for entry in found:
        assert entry["confidence"] > 80
        (place,) = entry["coordinates"]
        assert 0.3 < place["y"] < 0.5 and 0.2 < place["height"] < 0.4  # the text's band of the picture


def test_nsfw_answers_only_unsafe_labels(url):
    assert objects(post(url, kind="nsfw")) == []  # a cup of coffee is safe
    assert objects(post(url, kind="nsfw", nsfw_min_confidence=0))[0]["name"] == "nsfw"  # its score, however low


def test_celebrities_without_an_identities_flow_is_an_invalid_type(url):
    response = post(url, kind="celebrities", image=ASTRONAUT)
    assert response.status_code == 420
    assert json.loads(response.text)["status_message"].startswith("Invalid type: 'celebrities' is not installed")


# -- every documented error --------------------------------------------------------------------------------------

def test_300_for_a_post_without_any_data(url):
    error(requests.post(url, timeout=10), 300, "Invalid request, no data received")
    error(requests.get(url, timeout=10), 300, "Invalid request, no data received")


def test_400_without_an_apikey(url):
    error(post(url, key=None), 400, "APIkey missing")
    error(post(url, key=""), 400, "APIkey missing")


def test_401_for_a_wrong_apikey(url):
    error(post(url, key="nope"), 401, "APIkey invalid")
    error(requests.get(url, params={"apikey": "nope", "type": "cache"}, timeout=10), 401, "APIkey invalid")


def test_412_for_a_file_that_does_not_decode(url):
    error(post(url, image=COFFEE[: len(COFFEE) // 2]), 412, "Invalid file")
    png = text_png()
    error(post(url, image=png[:40] + bytes(200) + png[-12:]), 412, "Invalid file")
    error(post(url, image=b""), 412, "Invalid file")


def test_413_for_a_file_over_50_mb(url):
    just_over = b"\xff\xd8\xff" + bytes(52_428_800 - 2)
    error(post(url, image=just_over), 413, "Image size too large")
    far_over = b"\xff\xd8\xff" + bytes(60_000_000)  # refused from Content-Length, before the body is read
    error(post(url, image=far_over), 413, "Image size too large")


def test_415_for_other_formats(url):
    bmp = cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    for image in (bmp, b"GIF89a" + bytes(100), b"just some text"):
        error(post(url, image=image), 415, "Invalid file format")


def test_420_for_an_unknown_or_missing_type(url):
    error(post(url, kind="faces"), 420, "Invalid type")
    error(post(url, kind=None), 420, "Invalid type")
    response = requests.get(url, params={"apikey": "line-key", "type": "objects"}, timeout=10)
    assert response.status_code == 420  # GET only with type=cache


@pytest.mark.parametrize("fields, message", [
    ({}, "Missing parameter file: send the image as the form's 'file' field"),
    ({"max_labels": "0"}, "Invalid parameter max_labels: '0' is not an integer > 0"),
    ({"max_labels": "2.5"}, "Invalid parameter max_labels: '2.5' is not an integer > 0"),
    ({"min_confidence": "101"}, "Invalid parameter min_confidence: '101' is not a number from 0 to 100"),
    ({"min_confidence": "nan"}, "Invalid parameter min_confidence: 'nan' is not a number from 0 to 100"),
    ({"type": "nsfw", "nsfw_min_confidence": "-1"},
     "Invalid parameter nsfw_min_confidence: '-1' is not a number from 0 to 100"),
])
def test_430_for_an_invalid_or_missing_parameter(url, fields, message):
    fields = dict(fields)
    kind = fields.pop("type", "objects")
    error(post(url, kind=kind, image=None if not fields else COFFEE, **fields), 430, message)


def test_402_when_the_daily_quota_is_spent_and_errors_do_not_count(url):
    error(post(url, key="tiny-key", image=b"not an image"), 415, "Invalid file format")
    first = json.loads(post(url, key="tiny-key").text)["data"]["quota"]
    second = json.loads(post(url, key="tiny-key").text)["data"]["quota"]
    assert (first, second) == (1, 0)
    error(post(url, key="tiny-key"), 402, "Quota limit reached")
    # Another key's quota is its own; a key without one reports the largest int32 (not null: clients compare it).
    assert json.loads(post(url, key="line-key").text)["data"]["quota"] == 2**31 - 1


def test_quota_decreases_by_one_per_analysis(url):
    before = json.loads(post(url, key="mes-key").text)["data"]["quota"]
    after = json.loads(post(url, key="mes-key", kind="detect_text", image=text_png()).text)["data"]["quota"]
    assert after == before - 1 and before < 1000


def test_cache_returns_this_keys_last_results_most_recent_first(url):
    objects(post(url, key="YOUR-API-KEY", kind="detect_faces", image=ASTRONAUT))
    objects(post(url, key="YOUR-API-KEY", kind="detect_text", image=text_png()))
    for response in (requests.get(url, params={"apikey": "YOUR-API-KEY", "type": "cache"}, timeout=10),
                     requests.post(url, data={"apikey": "YOUR-API-KEY", "type": "cache"}, timeout=10)):
        body = json.loads(response.text)
        assert body["data"]["type"] == "cache"
        kinds = [entry["type"] for entry in body["data"]["objects"]]
        assert kinds[:2] == ["detect_text", "detect_faces"] and len(kinds) <= 3  # cache_size 3
        assert body["data"]["objects"][1]["objects"][0]["name"] == "Face"
        assert all(set(entry) == {"type", "objects", "time"} for entry in body["data"]["objects"])
    # The tiny key never saw a face nor read text: it sees only its own results.
    tiny = json.loads(requests.get(url, params={"apikey": "tiny-key", "type": "cache"}, timeout=10).text)
    assert {entry["type"] for entry in tiny["data"]["objects"]} <= {"objects"}


# -- bad input of every kind -------------------------------------------------------------------------------------

def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_bad_input_gets_this_apis_errors_and_the_server_keeps_serving(server, url):
    multipart = "multipart/form-data; boundary=xyz"
    cases = [
        (requests.post(url, data=b"garbage", headers={"Content-Type": multipart}), 300),
        (requests.post(url, data=b"\x00\xff" * 100, headers={"Content-Type": "application/octet-stream"}), 300),
        (requests.post(url, files={"apikey": b"\xff\xfe", "type": b"objects", "file": COFFEE}), 401),
        (requests.post(url, data={"apikey": "line-key", "type": "objécts"}, files={"file": COFFEE}), 420),
        (requests.post(url, data={"apikey": "line-key", "type": "objects", "max_labels": "x" * 100_000},
                       files={"file": COFFEE}), 430),
        (requests.post(url, data={"apikey": "line-key", "type": "objects", "min_confidence": "1e999"},
                       files={"file": COFFEE}), 430),
        (requests.post(url, data={"apikey": "line-key", "type": "objects", "file": "not a file"}), 415),
        (requests.put(url, data={"apikey": "line-key"}), 405),
        (requests.get(server.url + "/api/v2/objects"), 404),
        (post(url, image=cv2.imencode(".png", np.zeros((1, 1), np.uint8))[1].tobytes()), 200),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.headers["Content-Type"] == "text/html; charset=UTF-8"
        body = json.loads(response.text)
        assert body["status"] == status
        assert ("status_message" in body and body["data"] is None) if status != 200 else body["message"]
    answer = raw(server.port, b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                              b"boundary=b\r\nContent-Length: 100\r\n\r\n--b\r\nContent-Disposition: form-data")
    assert answer.split(b"\r\n")[0] in (b"HTTP/1.1 300 Multiple Choices", b"HTTP/1.1 400 Bad Request", b"")
    assert objects(post(url))[0]["name"] == "espresso"
    assert server.serving()


def test_the_cores_own_refusals_keep_their_status_in_this_apis_shape(server):
    head = (b"POST /api/v2/ HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000\r\n\r\n--b\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)  # and nothing more: the body does not come within body_read_timeout_s
        answer = sock.recv(65536)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    assert b"Content-Type: text/html; charset=UTF-8" in rest
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1]) == {
        "status": 408, "status_message": "body not received within 2 s", "data": None}


def test_a_tiny_picture_is_answered_with_the_flows_error_in_data_error(url):
    tiny = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes()
    body = json.loads(post(url, image=tiny).text)
    assert body["status"] == 200 and body["data"]["objects"] == []
    assert isinstance(body["data"]["error"], str) and "too small" in body["data"]["error"]


# -- a project without keys, and the quota across a restart ------------------------------------------------------

def test_without_project_keys_any_apikey_passes_and_quota_survives_a_restart(tmp_path):
    folder = vision_project(tmp_path / "open", capabilities={"objects": str(VISION / "objects.yaml")},
                            api_settings={"imagerecognize": {"daily_quota": 2}})
    server = start_server(folder, log_level="INFO", env=shared_model_cache_env())
    try:
        url = f"{server.url}/api/v3"
        error(post(url, key=None), 400, "APIkey missing")
        assert json.loads(post(url, key="anything").text)["data"]["quota"] == 1
        assert json.loads(post(url, key="anything").text)["data"]["quota"] == 0
        error(post(url, key="anything"), 402, "Quota limit reached")
        assert json.loads(post(url, key="another").text)["data"]["quota"] == 1  # each apikey its own count
        error(post(url, kind="detect_faces"), 420,
              "Invalid type: 'detect_faces' is not installed on this appliance: project.yaml names no flow for "
              "the capability 'faces' (capabilities:)")
    finally:
        assert server.stop() == 0
    saved = json.loads((folder / "imagerecognize-quota.json").read_text())
    assert saved["day"] == date.today().isoformat() and sorted(saved["used"].values()) == [1, 2]
    assert "anything" not in json.dumps(saved)  # apikeys are stored as hashes
    server = start_server(folder, log_level="INFO", env=shared_model_cache_env())
    try:
        error(post(f"{server.url}/api/v3", key="anything"), 402, "Quota limit reached")
        assert json.loads(post(f"{server.url}/api/v3", key="another").text)["data"]["quota"] == 0
        # No quota configured for type=cache's answer either: it reports what is left, and costs nothing.
        cached = json.loads(requests.get(f"{server.url}/api/v3", params={"apikey": "another", "type": "cache"}).text)
        assert cached["data"]["quota"] == 0 and len(cached["data"]["objects"]) == 1
    finally:
        server.stop()


def test_quota_is_full_again_after_local_midnight(tmp_path, monkeypatch):
    book = accounts.QuotaBook(tmp_path / "q.json", 1, {})
    assert book.take("a") and not book.take("a")

    class Tomorrow(date):
        @classmethod
        def today(cls):
            return date.fromordinal(date.today().toordinal() + 1)

    monkeypatch.setattr(accounts, "date", Tomorrow)
    assert book.remaining("a") == 1 and book.take("a")
    assert Tomorrow.today() - date.today() == timedelta(days=1)


# -- the jQuery example's logic in a real browser -------------------------------------------------------------------

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@needs_tool("chromium")
def test_the_html_examples_json_parse_works_in_a_browser(url, tmp_path):
    """The document's page posts FormData and calls JSON.parse on the answer's text; jQuery is not available
    offline, so the same request is made with XMLHttpRequest, whose responseText is what jQuery hands over
    for a text/html answer."""
    page = tmp_path / "example.html"
    page.write_text(textwrap.dedent(f"""\
        <!DOCTYPE html><html><body><pre id="out">pending</pre><script>
        var form_data = new FormData();
        form_data.append('type', 'objects');
        form_data.append('file', new Blob([Uint8Array.from(atob('{base64.b64encode(COFFEE).decode()}'),
                                           c => c.charCodeAt(0))], {{type: 'image/jpeg'}}), 'image.jpg');
        form_data.append('apikey', 'YOUR-API-KEY');
        form_data.append('min_confidence', '80');
        form_data.append('max_labels', '10');
        var xhr = new XMLHttpRequest();
        xhr.open('POST', '{url}');
        xhr.onload = function() {{
            var response_data_JSON = JSON.parse(xhr.responseText)['data'];
            document.getElementById('out').textContent = 'OK ' + xhr.status + ' ' +
                xhr.getResponseHeader('Content-Type') + ' ' + JSON.stringify(response_data_JSON);
        }};
        xhr.onerror = function() {{ document.getElementById('out').textContent = 'Error'; }};
        xhr.send(form_data);
        </script></body></html>"""))
    run = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-web-security",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert "OK 200 text/html; charset=UTF-8" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    assert '"name":"espresso"' in run.stdout


# The document's HTML/Javascript example, verbatim.
HTML_EXAMPLE = """<!DOCTYPE html>
<html lang="en">
<meta charset="UTF-8">
<meta name="viewport" content="width=device-width,initial-scale=1">

<script src="https://cdnjs.cloudflare.com/ajax/libs/jquery/3.3.1/jquery.min.js">
</script>
<script type="text/javascript">

function send_request() {
    var APIKEY = "YOUR-API-KEY"
    var file_obj = document.getElementById("image-file").files[0];

    var form_data = new FormData();
    form_data.append('type', 'objects');
    form_data.append('file', file_obj);
    form_data.append('apikey', APIKEY);
    form_data.append('min_confidence', '80');
    form_data.append('max_labels', '10');

    $.ajax({
        type: 'POST',
        url: 'https://imagerecognize.com/api/v2/',
        contentType: false,
        processData: false,
        data: form_data,

        statusCode: {
            402:function() {
                document.getElementById('response1').innerHTML = "402";
            }
        },
        error:function() {
            document.getElementById('response1').innerHTML = "Error";
        },
        success:function(response) {
            document.getElementById('response1').innerHTML = response;

            var response_data_JSON = JSON.parse(response)['data'];
            var response_pretty = JSON.stringify(response_data_JSON, undefined, 2)
            document.getElementById('response2').innerHTML = response_pretty
        }
    });
};
</script>
<body>

<input type="file" name="file" id="image-file">
<button onclick="javascript:send_request()" name="submit">Send request</button>

<p id="response1"></p>
<pre id="response2"></pre>

</body>
</html>"""
JQUERY = Path("/usr/share/javascript/jquery/jquery.min.js")  # Debian's libjs-jquery (3.6.1), no internet needed


@needs_tool("chromium")
def test_the_documents_html_example_works_in_a_browser(url, tmp_path):
    """The page as written, jQuery from the disk and our host instead of imagerecognize.com; a script chooses
    the file (as a user would with the file input) and presses the button."""
    picture = base64.b64encode(COFFEE).decode()
    page = HTML_EXAMPLE.replace("https://cdnjs.cloudflare.com/ajax/libs/jquery/3.3.1/jquery.min.js",
                                JQUERY.as_uri()).replace("https://imagerecognize.com/api/v2/", url)
    page = page.replace("</body>", f"""<script>
        var bytes = Uint8Array.from(atob('{picture}'), c => c.charCodeAt(0));
        var chosen = new DataTransfer();
        chosen.items.add(new File([bytes], 'image.jpg', {{type: 'image/jpeg'}}));
        document.getElementById('image-file').files = chosen.files;
        document.getElementsByName('submit')[0].click();
        </script></body>""")
    (tmp_path / "example.html").write_text(page)
    run = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-web-security",
                          "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=20000", "--dump-dom", (tmp_path / "example.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    pretty = run.stdout.split('<pre id="response2">', 1)[-1].split("</pre>", 1)[0]
    assert '"name": "espresso"' in pretty, run.stdout[-3000:] + run.stderr[-2000:]
    assert '<p id="response1">{"status":200,"message":"Success"' in run.stdout


# -- celebrities: the enrolled people of the project's gallery -------------------------------------------------------

IDENTITIES = {"nodes": {"faces": {"type": "faces@1", "model": "face_full", "mode": "none", "next": ["identify"]},
                        "identify": {"type": "identify@1"}}}


def test_celebrities_names_an_enrolled_person_and_leaves_strangers_out(tmp_path, serve_in_process):
    from appliance.faces_gallery import enrol

    folder = vision_project(tmp_path / "gallery", api_keys={"line": "line-key"},
                            capabilities={"faces": str(VISION / "faces.yaml"), "identities": IDENTITIES})
    assert enrol(folder, "Eileen Collins", [cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)]) == 1
    server = serve_in_process(folder, log_level="INFO")
    url = f"{server.url}/api/v2/"
    (person,) = objects(post(url, kind="celebrities", image=ASTRONAUT))
    assert person["name"] == "Eileen Collins" and person["confidence"] > 90  # the same photo: distance ~0
    (place,) = person["coordinates"]
    assert 0.25 < place["x"] < 0.38 and 0.05 < place["y"] < 0.18
    # The cameraman's face is found, but he is nobody enrolled: left out.
    cameraman = jpeg(cv2.cvtColor(skdata.camera(), cv2.COLOR_GRAY2RGB))
    assert len(objects(post(url, kind="detect_faces", image=cameraman))) == 1
    assert objects(post(url, kind="celebrities", image=cameraman)) == []
