"""The console's API against a real server on 127.0.0.1: sessions, CSRF, the key, the gallery, collection of line
frames, inspection, the live stream's throttle, and what it logs."""

from __future__ import annotations

import io
import json
import re
import threading
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from aiohttp.test_utils import make_mocked_request

from appliance.config.loader import load_project_files
from appliance.config.project import ConsoleSettings
from appliance.console.security import Guard
from appliance.errors import ConfigError, Forbidden
from tests.conftest import Server, start_server, write_project
from tests.console.conftest import VERDICT_FLOW, VERDICT_HOOK, ConsoleClient, console_project


def png(seed: int, size: tuple[int, int] = (120, 160)) -> tuple[bytes, np.ndarray]:
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes(), image


def analyze(server: Server, body: bytes, data: str = "") -> dict:
    answer = requests.post(f"{server.url}/analyze_image", params={"data": data}, data=body, timeout=30)
    answer.raise_for_status()
    return answer.json()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    project = console_project(tmp_path_factory.mktemp("console") / "line",
                              console={"live_fps": 2, "gallery": {"max_frames": 4, "ok_every_s": 0,
                                                                  "max_per_second": 50}})
    running = start_server(project, log_level="INFO")
    yield running
    running.stop()


def wait_for(condition, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_console_is_off_unless_enabled(tmp_path: Path) -> None:
    project = write_project(tmp_path / "off", VERDICT_FLOW, hooks={"judge": VERDICT_HOOK})
    server = start_server(project)
    try:
        answer = requests.get(f"{server.url}/console/api/session", timeout=10)
        assert answer.status_code == 404
        assert answer.json()["message"].startswith("no endpoint at /console/api/session")
    finally:
        server.stop()


def test_page_and_session_on_this_machine_need_no_key(server: Server) -> None:
    page = requests.get(f"{server.url}/console/", timeout=10)
    assert page.status_code == 200 and "<title>Operator console</title>" in page.text
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith("appliance_console_test=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/console/" in cookie
    client = ConsoleClient(server)
    assert client.session["project"] == "test" and client.session["login_required"] is False
    assert re.fullmatch(r"[0-9a-f]{8}", client.session["session"])


def test_state_changing_call_without_the_csrf_token_is_refused(server: Server) -> None:
    client = ConsoleClient(server)
    refused = client.http.post(f"{client.url}/teach/collect", json={"set": "good", "count": 1}, timeout=10)
    assert refused.status_code == 403
    assert refused.json() == {"status": 403, "message": "missing or wrong CSRF token (X-Console-CSRF); reload the page",
                              "data": None}
    wrong = client.post("teach/collect", {"set": "good", "count": 1}, headers={"X-Console-CSRF": "guess"})
    assert wrong.status_code == 403
    other_site = client.post("teach/collect", {"set": "good", "count": 1}, headers={"Origin": "http://evil.example"})
    assert other_site.status_code == 403
    assert other_site.json()["message"] == "request from another site (http://evil.example) refused"
    assert client.get("teach").json()["collecting"] is None  # nothing was started


def test_a_foreign_host_name_is_refused_on_this_machine(server: Server) -> None:
    """A page of another site whose name was re-pointed at 127.0.0.1 (DNS rebinding) gets no session."""
    answer = requests.get(f"{server.url}/console/api/session", headers={"Host": "evil.example:80"}, timeout=10)
    assert answer.status_code == 403
    assert "Set-Cookie" not in answer.headers
    assert answer.json()["message"].startswith("the console answers this machine's own names only")


def test_gallery_keeps_ng_frames_and_hook_saves_within_its_bounds_and_zips_them(server: Server) -> None:
    client = ConsoleClient(server)
    sent = {}
    for index, data in enumerate(["ok", "ng-1", "save-ok", "ng-2", "ng-3", "ng-4"]):
        body, image = png(index)
        analyze(server, body, data)
        sent[data] = image
    # max_frames 4: of the 5 kept (4 NG and the frame a hook marked with save), the oldest, ng-1, is gone.
    # Written by the console's own thread: wait until the last NG frame is listed.
    listing = wait_for(lambda: (found := client.get("gallery").json())["entries"][:1] and
                       found["entries"][0]["data"] == "ng-4" and found)
    assert [entry["data"] for entry in listing["entries"]] == ["ng-4", "ng-3", "ng-2", "save-ok"]
    assert [entry["reason"] for entry in listing["entries"]] == ["ng", "ng", "ng", "save"]
    assert listing["nodes"] == ["judge"]
    assert listing["entries"][-1]["verdict"] is True
    ng_only = client.get("gallery", params={"verdict": "ng"}).json()
    assert [entry["data"] for entry in ng_only["entries"]] == ["ng-4", "ng-3", "ng-2"]
    assert client.get("gallery", params={"node": "nothing"}).json()["entries"] == []
    later = client.get("gallery", params={"since": listing["entries"][0]["time"]}).json()
    assert [entry["data"] for entry in later["entries"]] == ["ng-4"]

    ids = [entry["id"] for entry in listing["entries"][:2]]
    answer = client.post("gallery/zip", {"ids": ids})
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(answer.content))
    assert sorted(archive.namelist()) == sorted([f"ng/{i}.png" for i in ids] + [f"ng/{i}.json" for i in ids])
    frame = cv2.imdecode(np.frombuffer(archive.read(f"ng/{ids[0]}.png"), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(frame, sent["ng-4"])  # the frame as the camera sent it, lossless
    again = client.post(f"inspect?gallery={ids[0]}", data=b"")  # Inspect on a gallery frame: the flow again
    assert again.status_code == 200 and again.json()["frame"] == {"width": 160, "height": 120}
    context = json.loads(archive.read(f"ng/{ids[0]}.json"))
    assert context["context"]["result"] is False and context["context"]["data"] == "ng-4"
    assert context["decided_by"] == [{"node": "judge", "reason": "result set by a Code hook"}]


def test_collecting_the_next_frames_of_the_line_adds_them_as_good_images(server: Server) -> None:
    client = ConsoleClient(server)
    client.post("teach/remove", {"set": "good", "name": None}).raise_for_status()
    assert client.post("teach/collect", {"set": "good", "count": 3}).status_code == 200
    for index in range(5):
        analyze(server, png(100 + index)[0], "ok")
    state = wait_for(lambda: (found := client.get("teach").json())["collecting"] is None and found)
    assert len(state["images"]["good"]) == 3 and all(name.startswith("line-") for name in state["images"]["good"])
    thumbnail = client.get("teach/thumbnail", params={"set": "good", "name": state["images"]["good"][0]})
    assert thumbnail.headers["Content-Type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(thumbnail.content, np.uint8), cv2.IMREAD_COLOR).shape == (120, 160, 3)
    bad_count = client.post("teach/collect", {"set": "good", "count": 0})
    assert bad_count.status_code == 400 and bad_count.json()["message"] == "count must be a whole number from 1 to 200"


def test_inspect_answers_with_the_flow_but_counts_nothing(server: Server) -> None:
    client = ConsoleClient(server)
    before = client.get("stats").json()["start"]
    answer = client.post("inspect", data=png(7)[0], params={"name": "part.png"})
    assert answer.status_code == 200
    result = answer.json()
    assert result["verdict"] is True and result["frame"] == {"width": 160, "height": 120}
    assert result["image"].startswith("data:image/jpeg;base64,") and "heatmap" not in result
    assert [node for node, _ in result["timings"]] == ["judge"]
    assert result["context"]["imageShape"] == {"height": 120, "width": 160}
    after = client.get("stats").json()["start"]
    assert (after["ok"], after["ng"]) == (before["ok"], before["ng"])
    not_an_image = client.post("inspect", data=b"not an image")
    assert not_an_image.status_code == 415
    assert not_an_image.json()["message"] == requests.post(f"{server.url}/analyze_image", data=b"not an image",
                                                           timeout=10).json()["message"]  # as PEKAT's API says it


def test_stats_read_the_counters_metrics_shows(server: Server) -> None:
    client = ConsoleClient(server)
    before = client.get("stats").json()["start"]
    analyze(server, png(1)[0], "ok")
    analyze(server, png(2)[0], "ng")
    stats = client.get("stats").json()
    assert (stats["start"]["ok"] - before["ok"], stats["start"]["ng"] - before["ng"]) == (1, 1)
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    ok = float(re.search(r'^appliance_verdicts_total\{result="ok"\} (\S+)$', metrics, re.M).group(1))
    ng = float(re.search(r'^appliance_verdicts_total\{result="ng"\} (\S+)$', metrics, re.M).group(1))
    assert (stats["start"]["ok"], stats["start"]["ng"]) == (ok, ng)
    assert stats["start"]["p50_ms"] is not None and stats["queued"] == 0 and stats["in_flight"] == 0


def read_events(response: requests.Response, events: list[dict], until: str) -> None:
    """Frame events of the stream, until one whose data is ``until``."""
    kind = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: ") and kind == "frame":
            events.append(json.loads(line[len("data: "):]))
            if events[-1]["data"] == until:
                return


def test_live_stream_is_throttled_and_the_latest_frame_wins(server: Server) -> None:
    """live_fps 2: frames sent back to back reach the page as a few pictures, the last one among them."""
    client = ConsoleClient(server)
    stream = client.http.get(f"{client.url}/live", stream=True, timeout=30)
    assert stream.headers["Content-Type"] == "text/event-stream"
    events: list[dict] = []
    sent = 40
    reader = threading.Thread(target=read_events, args=(stream, events, f"ok-{sent - 1}"), daemon=True)
    reader.start()
    started = time.monotonic()
    with requests.Session() as line:
        for index in range(sent):
            line.post(f"{server.url}/analyze_image", params={"data": f"ok-{index}"}, data=png(index % 4)[0],
                      timeout=30).raise_for_status()
    sending = time.monotonic() - started
    reader.join(10)
    stream.close()
    assert not reader.is_alive(), [event["data"] for event in events]
    # At most 2 pictures a second while sending (and the one drawn at once for the new page, and the last).
    pushed = [event for event in events if event["data"].startswith("ok-")]
    assert len(pushed) <= 2 * sending + 3, (len(pushed), sending)
    assert len(pushed) < sent
    assert pushed[-1]["data"] == f"ok-{sent - 1}" and pushed[-1]["verdict"] is True
    assert pushed[-1]["image"].startswith("data:image/jpeg;base64,")


def test_every_console_action_is_logged_with_its_session(server: Server) -> None:
    client = ConsoleClient(server)
    client.post("teach/collect", {"set": "bad", "count": 2}).raise_for_status()
    client.post("teach/collect/stop").raise_for_status()
    log = server.log_text()
    session = client.session["session"]
    assert f"console session {session}: teach: collecting the next 2 frames of the line as bad" in log
    assert f"console session {session}: teach: collection stopped" in log


# -- the key, when the project listens beyond this machine --------------------------------------------------------

KEY = "k3y-for-the-console-only"


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory):
    project = console_project(tmp_path_factory.mktemp("console") / "exposed", host="0.0.0.0", api_key=KEY)
    running = start_server(project, "--host", "0.0.0.0", log_level="DEBUG")
    yield running
    running.stop()


def test_without_the_key_the_console_is_refused_when_the_project_listens_beyond_loopback(exposed: Server) -> None:
    http = requests.Session()
    session = http.get(f"{exposed.url}/console/api/session", timeout=10)
    assert session.status_code == 401
    assert session.json()["message"] == "log in to the console with the project's key"
    assert "Set-Cookie" not in session.headers
    for path in ("stats", "gallery", "teach", "models", "live"):
        answer = http.get(f"{exposed.url}/console/api/{path}", timeout=10)
        assert answer.status_code == 401, path
    wrong = http.post(f"{exposed.url}/console/api/login", json={"key": "nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["message"] == "wrong key"
    # The page itself loads (it asks for the key); the API answers once logged in.
    assert http.get(f"{exposed.url}/console/", timeout=10).status_code == 200
    login = http.post(f"{exposed.url}/console/api/login", json={"key": KEY}, timeout=10)
    assert login.status_code == 200
    cookie = login.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    answer = login.json()
    assert answer["logged_in_with_key"] is True and KEY not in json.dumps(answer)
    assert http.get(f"{exposed.url}/console/api/stats", timeout=10).status_code == 200
    # Logged out: the cookie is worth nothing any more.
    http.post(f"{exposed.url}/console/api/logout", headers={"X-Console-CSRF": answer["csrf"]}, timeout=10)
    again = requests.get(f"{exposed.url}/console/api/stats", timeout=10,
                         cookies={"appliance_console_test": cookie.split(";")[0].split("=", 1)[1]})
    assert again.status_code == 401
    assert KEY not in exposed.log_text()  # DEBUG logs every request line: the key is in none of them


def test_wrong_keys_are_refused_for_a_while_after_five(exposed: Server) -> None:
    http = requests.Session()
    codes = [http.post(f"{exposed.url}/console/api/login", json={"key": f"guess-{i}"}, timeout=10).status_code
             for i in range(6)]
    assert codes[-1] == 429
    refused = http.post(f"{exposed.url}/console/api/login", json={"key": KEY}, timeout=10)
    assert refused.status_code == 429 and refused.json()["message"].startswith("too many wrong keys from 127.0.0.1")


def test_other_machines_are_refused_unless_console_remote() -> None:
    """The peer check reads the socket's own address (a real aiohttp Request on a transport from 192.0.2.7)."""

    class Transport:
        def get_extra_info(self, name: str, default=None):
            return ("192.0.2.7", 50000) if name == "peername" else default

        def is_closing(self) -> bool:
            return False

    request = make_mocked_request("GET", "/console/api/stats", transport=Transport())
    local_only = Guard(ConsoleSettings(enabled=True), "line", False, {"default": b"k"})
    with pytest.raises(Forbidden, match="the console is served to this machine only"):
        local_only.require(request, changes_state=False)
    remote = Guard(ConsoleSettings(enabled=True, remote=True), "line", False, {"default": b"k"})
    assert remote.login_needed(request) is True


def test_remote_console_without_a_key_is_a_configuration_problem(tmp_path: Path) -> None:
    project = console_project(tmp_path / "p", console={"remote": True})
    with pytest.raises(ConfigError) as problems:
        load_project_files(project)
    (problem,) = problems.value.problems
    assert problem.endswith("console.remote needs the project's api_key (or api_keys): browsers on other machines "
                            "log in with it")
    assert "project.yaml:1" in problem


def test_an_open_live_page_does_not_hold_the_stop(tmp_path: Path) -> None:
    """SIGTERM drains the requests in progress; the live stream is one, and it ends at the stop instead of being
    abandoned when the drain's time is up."""
    server = start_server(console_project(tmp_path / "p", limits={"drain_timeout_s": 20}), log_level="INFO")
    try:
        client = ConsoleClient(server)
        stream = client.http.get(f"{client.url}/live", stream=True, timeout=30)
        assert stream.status_code == 200
        assert server.stop() == 0
        stream.close()
        log = server.log_text()
        assert "abandoned" not in log and "drain timeout" not in log
    finally:
        server.stop()
