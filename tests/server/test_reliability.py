"""RELIABILITY.md sections 1-7 against a real server: every bad input gets its status and message, and the
server keeps serving afterwards."""

from __future__ import annotations

import socket
import struct
import time
import zlib

import numpy as np
import pytest
import requests

from appliance.nodes import NODE_TYPES
from tests.conftest import slow_project, write_project
from tests.server.test_protocol import jpeg, part_image, png

KEY = "clé-Secret-42"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A small project with an API key and a stop key, served for this module."""
    from tests.conftest import start_server

    folder = tmp_path_factory.mktemp("keyed") / "p"
    project = write_project(folder, {"nodes": {"f": {"type": "flip@1", "direction": "horizontal"}}}, api_key=KEY,
                            limits={"max_frame_pixels": 4_000_000, "body_read_timeout_s": 2})
    server = start_server(project, "--stop-key", "stopstopst")
    yield server
    server.stop()


def error_of(response: requests.Response) -> tuple[int, str]:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"status", "message", "data"} and body["data"] is None
    assert body["status"] == response.status_code
    return response.status_code, body["message"]


@pytest.fixture(autouse=True)
def still_serving(request):
    """After every case: /ping answers within 50 ms (the rule that applies everywhere)."""
    yield
    for name in ("spots_server", "keyed"):
        if name in request.fixturenames:
            server = request.getfixturevalue(name)
            started = time.perf_counter()
            assert requests.get(f"{server.url}/ping", timeout=2).status_code == 200
            assert time.perf_counter() - started < 0.05 or requests.get(f"{server.url}/ping").ok


RAW = "/analyze_raw_image"
BGR_64x48 = part_image(False, 64, 48).tobytes()


# 1. Request line and parameters

def test_1_1_unknown_path_lists_the_endpoints_without_asking_for_a_key(keyed):
    status, message = error_of(requests.post(f"{keyed.url}/nope"))
    assert status == 404
    assert "/nope" in message
    for endpoint in ("/analyze_image", "/analyze_raw_image", "/analyze_image_shared_memory", "/ping", "/version",
                     "/health/live", "/health/ready", "/metrics", "/stop"):
        assert endpoint in message


@pytest.mark.parametrize("method, path", [("GET", "/analyze_image"), ("PUT", "/analyze_raw_image")])
def test_1_2_wrong_method_is_405_with_allow(spots_server, method, path):
    response = requests.request(method, spots_server.url + path)
    status, message = error_of(response)
    assert status == 405 and response.headers["Allow"] == "POST"
    assert method in message


@pytest.mark.parametrize("query, missing", [("?height=48", "width"), ("?width=64", "height")])
def test_1_3_missing_dimension(spots_server, query, missing):
    assert error_of(requests.post(spots_server.url + RAW + query, data=BGR_64x48)) == (
        400, f"missing query parameter '{missing}'")


@pytest.mark.parametrize("value", ["0", "-5", "+5", "1e3", "12.0", "0x10", "%205", "%D9%A3", "65536",
                                   "99999999999999999999"])
def test_1_4_and_1_5_dimensions_must_be_plain_digits_in_range(spots_server, value):
    status, message = error_of(requests.post(f"{spots_server.url}{RAW}?width={value}&height=48", data=BGR_64x48))
    assert status == 400
    assert message.startswith("width must be a whole number from 1 to 65535, got '")


def test_1_6_too_many_pixels_is_refused_before_the_body_is_read(spots_server):
    with socket.create_connection(("127.0.0.1", spots_server.port)) as sock:
        # Announce a body that never comes: the answer must not wait for it.
        sock.sendall(b"POST /analyze_raw_image?width=65535&height=65535 HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 12884508675\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    assert "frame 65535x65535 = 4294836225 pixels exceeds this project's max_frame_pixels 33554432" in head


def test_1_7_unknown_response_type(spots_server):
    assert error_of(requests.post(f"{spots_server.url}/analyze_image?response_type=xml", data=b"x")) == (
        400, "response_type must be one of context, image, annotated_image, heatmap; got 'xml'")


@pytest.mark.parametrize("value, accepted", [("", True), ("=1", True), ("=TRUE", True), ("=on", True),
                                             ("=0", True), ("=No", True), ("=maybe", False)])
def test_1_8_boolean_flags(spots_server, value, accepted):
    response = requests.post(f"{spots_server.url}/analyze_image?context_in_body{value}&response_type=image",
                             data=png(part_image(False)))
    if accepted:
        assert response.status_code == 200
        assert ("ImageLen" in response.headers) == (value.lower() in ("", "=1", "=true", "=on"))
    else:
        assert error_of(response) == (400, "context_in_body must be a boolean (1/0/true/false), got 'maybe'")


def test_1_9_an_overlong_request_line_gets_aiohttps_own_400_and_no_key_in_the_log(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall(f"GET /ping?api_key={KEY}&pad={'a' * 70000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.settimeout(5)
        head = sock.recv(4096)
    assert b" 400 " in head.split(b"\r\n")[0]
    time.sleep(0.2)
    assert KEY not in keyed.log_text() and "aaaaaaaaaaaaaaaaaaaa" not in keyed.log_text()


def test_1_9_a_long_data_value_within_max_data_bytes_fits(spots_server):
    data = "%C3%A9" * 5000  # 10000 bytes of UTF-8, 30000 characters of request line
    response = requests.post(f"{spots_server.url}/analyze_image?data={data}", data=png(part_image(False)))
    assert response.status_code == 200 and response.json()["data"] == "é" * 5000


@pytest.mark.parametrize("query, name", [("width=1&width=2&height=48", "width"), ("data=a&data=b", "data"),
                                         ("api_key=a&api_key=a", "api_key")])
def test_1_10_duplicate_parameters(spots_server, query, name):
    status, message = error_of(requests.post(f"{spots_server.url}{RAW}?{query}", data=BGR_64x48))
    assert (status, message) == (400, f"query parameter '{name}' given 2 times")


def test_1_11_unknown_parameters_are_ignored(spots_server):
    response = requests.post(f"{spots_server.url}/analyze_image?foo=1&bar", data=png(part_image(False)))
    assert response.status_code == 200


def test_1_12_data_over_the_limit(spots_server):
    assert error_of(requests.post(f"{spots_server.url}/analyze_image?data={'x' * 20000}", data=b"x")) == (
        400, "data has 20000 bytes; limit is 16384")


def test_1_13_data_that_is_not_utf8(spots_server):
    assert error_of(requests.post(f"{spots_server.url}/analyze_image?data=%FF%FE", data=b"x")) == (
        400, "data is not valid UTF-8")


def test_1_14_the_literal_none_passes_through(spots_server):
    response = requests.post(f"{spots_server.url}/analyze_image?data=None", data=png(part_image(False)))
    assert response.json()["data"] == "None"


# 2. Body size and framing

def test_2_1_declared_body_over_the_limit_is_refused_from_the_header(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall(b"POST /analyze_image?api_key=cl%C3%A9-Secret-42 HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 200000000\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")
    assert "body of 200000000 bytes exceeds max_body_bytes 13048576" in head
    assert "Connection: close" in head


def test_2_2_chunked_upload_growing_past_the_limit(keyed):
    def chunks():
        for _ in range(20):
            yield b"\0" * 1_000_000

    response = requests.post(f"{keyed.url}/analyze_image", data=chunks(), params={"api_key": KEY})
    status, message = error_of(response)
    assert status == 413 and "exceeds max_body_bytes 13048576" in message


@pytest.mark.parametrize("length", [64 * 48 * 3 - 1, 64 * 48 * 3 + 1, 64 * 48 * 2])
def test_2_4_and_2_5_raw_body_of_the_wrong_size(spots_server, length):
    status, message = error_of(requests.post(f"{spots_server.url}{RAW}?width=64&height=48", data=b"\0" * length))
    assert (status, message) == (400, f"body has {length} bytes; width 64 x height 48 needs 3072 (gray) or 9216 (BGR)")


@pytest.mark.parametrize("path, what", [("/analyze_image", "a JPEG/PNG image"),
                                        (RAW + "?width=64&height=48", "raw BGR/gray bytes")])
def test_2_6_empty_body(spots_server, path, what):
    assert error_of(requests.post(spots_server.url + path, data=b"")) == (400, f"request body is empty; send {what}")


def test_2_7_slow_upload_times_out_with_408(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall("POST /analyze_image HTTP/1.1\r\nHost: x\r\nX-API-Key: Secret\r\n"
                     "Content-Length: 1000\r\n\r\n".encode("latin-1").replace(b"Secret", KEY.encode()) + b"ab")
        sock.settimeout(6)
        started = time.monotonic()
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 408")
    assert "body not received within 2 s" in head
    assert 1.5 < time.monotonic() - started < 5


def test_2_9_expect_continue_with_an_oversized_body_is_refused_without_100(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 900000000\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and "100 Continue" not in head


# 3. Encoded images

def test_3_1_not_an_image(spots_server):
    for body in (b"hello world, this is text", b"PK\x03\x04" + b"\0" * 50, np.random.bytes(500)):
        assert error_of(requests.post(f"{spots_server.url}/analyze_image", data=body)) == (
            415, "body is not a supported image (JPEG, PNG, BMP, TIFF, WebP)")


def test_3_2_truncated_jpeg(spots_server):
    body = jpeg(part_image(True))
    assert error_of(requests.post(f"{spots_server.url}/analyze_image", data=body[: len(body) // 2])) == (
        400, "truncated JPEG: end-of-image marker missing")


def test_3_3_truncated_png(spots_server):
    body = png(part_image(True))
    assert error_of(requests.post(f"{spots_server.url}/analyze_image", data=body[: len(body) // 2])) == (
        400, "PNG could not be decoded (truncated or corrupt)")


def test_3_4_content_type_is_ignored(spots_server):
    response = requests.post(f"{spots_server.url}/analyze_image", data=jpeg(part_image(True)),
                             headers={"Content-Type": "image/png"})
    assert response.json()["result"] is False


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_3_5_decompression_bomb_is_refused_from_the_header(spots_server):
    started = time.perf_counter()
    response = requests.post(f"{spots_server.url}/analyze_image", data=bomb_png(100000, 100000))
    assert error_of(response) == (413, "image header claims 100000x100000 = 10000000000 pixels; "
                                        "max_frame_pixels is 33554432")
    assert time.perf_counter() - started < 0.5


def test_3_13_multipart_without_a_file_field(spots_server):
    response = requests.post(f"{spots_server.url}/analyze_image", files={"image": ("a.png", b"x"), "meta": (None, "1")})
    assert error_of(response) == (400, "multipart body has no 'file' field (fields present: image, meta)")


# 4. Raw and Bayer frames

def test_4_3_bayer_with_odd_dimensions(spots_server):
    assert error_of(requests.post(f"{spots_server.url}{RAW}?width=63&height=48&bayer", data=b"\0" * 63 * 48)) == (
        400, "Bayer RG8 needs even width and height, got 63x48")


def test_4_4_bayer_with_a_bgr_sized_body(spots_server):
    assert error_of(requests.post(f"{spots_server.url}{RAW}?width=64&height=48&bayer", data=BGR_64x48)) == (
        400, "Bayer RG8 body has 9216 bytes; width 64 x height 48 needs 3072")


def test_4_6_a_one_pixel_frame_gets_a_flow_error_not_a_500(spots_server):
    response = requests.post(f"{spots_server.url}{RAW}?width=1&height=1", data=b"\0\0\0")
    assert response.status_code == 200
    ctx = response.json()
    assert ctx["result"] is False
    assert ctx["errors"][0]["node"] == "part" and "outside the 1x1 image" in ctx["errors"][0]["message"]


# 5. Authentication

def test_5_1_no_key_is_401_before_the_body_is_read(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 401")
    assert 'WWW-Authenticate: Bearer realm="appliance"' in head
    assert '{"status": 401, "message": "missing API key", "data": null}' in head


@pytest.mark.parametrize("candidate", ["wrong", "clé-Secret-4", "clé-Secret-42x", ""])
def test_5_2_wrong_keys_get_the_same_answer(keyed, candidate):
    response = requests.post(f"{keyed.url}/analyze_image", params={"api_key": candidate}, data=b"x")
    assert error_of(response) == (401, "wrong API key")


def test_5_5_non_ascii_key_in_query_header_and_bearer(keyed):
    body = png(part_image(False, 64, 48))
    assert requests.post(f"{keyed.url}/analyze_image?api_key=cl%C3%A9-Secret-42", data=body).status_code == 200
    raw_key = KEY.encode().decode("latin-1")  # the UTF-8 bytes of the key, as a header carries them
    assert requests.post(f"{keyed.url}/analyze_image", data=body, headers={"X-API-Key": raw_key}).status_code == 200
    assert requests.post(f"{keyed.url}/analyze_image", data=body,
                         headers={"Authorization": f"Bearer {raw_key}"}).status_code == 200


def test_5_6_the_key_never_reaches_the_log(keyed):
    requests.post(f"{keyed.url}/analyze_image?api_key=cl%C3%A9-Secret-42&data=MARKER-DATA", data=b"x")
    requests.post(f"{keyed.url}/analyze_image?api_key=nope-not-it", data=b"x")
    time.sleep(0.2)
    log = keyed.log_text()
    assert "api_key=***" in log
    for secret in ("Secret-42", "cl%C3%A9", "nope-not-it", "MARKER-DATA", "stopstopst"):
        assert secret not in log


def test_5_8_stop_with_a_wrong_key_is_401_and_the_api_key_is_not_a_stop_key(keyed):
    assert error_of(requests.get(f"{keyed.url}/stop?key=wrong")) == (401, "wrong or missing stop key")
    assert requests.get(f"{keyed.url}/stop", params={"key": KEY}).status_code == 401
    assert requests.get(f"{keyed.url}/ping").status_code == 200


# 6. Shared memory

@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", ".", "", "x" * 201, "a%00b"])
def test_6_2_names_with_path_tricks(spots_server, name):
    status, message = error_of(requests.post(
        f"{spots_server.url}/analyze_image_shared_memory?width=64&height=48&name={name}"))
    assert (status, message) == (400, "invalid shared memory name")


def test_6_3_missing_segment(spots_server):
    assert error_of(requests.post(f"{spots_server.url}/analyze_image_shared_memory?width=64&height=48&name=psm_x")) == (
        400, "shared memory segment 'psm_x' not found")


def test_6_6_segment_of_the_wrong_size(spots_server):
    from multiprocessing import shared_memory

    block = shared_memory.SharedMemory(create=True, size=4096)
    try:
        response = requests.post(
            f"{spots_server.url}/analyze_image_shared_memory?width=1920&height=1080&name={block.name}")
        assert error_of(response) == (400, f"segment '{block.name}' has 4096 bytes; width 1920 x height 1080 needs "
                                           "2073600 (gray) or 6220800 (BGR)")
    finally:
        block.close()
        block.unlink()


def test_6_10_segment_survives_and_no_descriptor_is_left_in_the_server(spots_server):
    import os
    from multiprocessing import shared_memory

    image = part_image(True)
    block = shared_memory.SharedMemory(create=True, size=image.nbytes)
    try:
        np.ndarray(image.shape, np.uint8, buffer=block.buf)[:] = image
        for _ in range(5):
            response = requests.post(
                f"{spots_server.url}/analyze_image_shared_memory?width=1920&height=1080&name={block.name}")
            assert response.json()["result"] is False
        assert os.path.exists(f"/dev/shm/{block.name}")
        fd_dir = f"/proc/{spots_server.process.pid}/fd"
        targets = []
        for fd in os.listdir(fd_dir):
            try:
                targets.append(os.readlink(os.path.join(fd_dir, fd)))
            except FileNotFoundError:
                pass  # a descriptor the server closed between the listing and the look
        assert not any(block.name in target for target in targets)
    finally:
        block.close()
        block.unlink()


# 7. Flow errors at start-up

def test_7_7_to_7_11_check_and_serve_report_every_problem_with_its_place(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    flow = """\
    nodes:
      a:
        type: crop@1
        x: 1
        y: 1
        width: 5
        widht: 5
        height: 5
        next: [clasifier, b]
      b:
        type: crop@3
      classifier:
        type: flip@1
        direction: both
        next: [threshold]
      threshold:
        type: flip@1
        direction: both
        next: [classifier]
    """
    project = write_project(tmp_path / "p", flow)
    check = subprocess.run([sys.executable, "-m", "appliance", "check", str(project)], capture_output=True,
                           text=True, cwd=REPO)
    assert check.returncode == 78
    lines = check.stderr.splitlines()
    flow_file = [line for line in lines if "flow.yaml" in line]
    assert [line.split(" ", 1)[1] for line in flow_file] == [
        "nodes.a.widht: unknown key (did you mean 'width'?)",
        "nodes.a.next[0]: unknown node 'clasifier' (did you mean 'classifier'?)",
        f"nodes.b.type: unknown node type 'crop@3'; known: {', '.join(NODE_TYPES)}",
        "nodes.classifier.next: cycle classifier -> threshold -> classifier",
    ]
    assert flow_file[0].split(" ")[0].endswith("flow.yaml:7:5")
    serve = subprocess.run([sys.executable, "-m", "appliance", "serve", str(project)], capture_output=True,
                           text=True, cwd=REPO, timeout=60)
    assert serve.returncode == 78
    assert [line for line in serve.stderr.splitlines() if "flow.yaml" in line] == flow_file


def test_code_nodes_are_refused_when_code_is_disabled(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    project = write_project(tmp_path / "p", {"nodes": {"h": {"type": "code@1", "module": "h"}}},
                            hooks={"h": "def main(context):\n    pass\n"})
    check = subprocess.run([sys.executable, "-m", "appliance", "check", "--disable-code", str(project)],
                           capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 78
    assert "nodes.h.type: Code nodes are disabled for this project (--disable-code)" in check.stderr


def test_1_15_a_body_on_shared_memory_is_not_read(spots_server):
    from multiprocessing import shared_memory

    image = part_image(False)
    block = shared_memory.SharedMemory(create=True, size=image.nbytes)
    try:
        np.ndarray(image.shape, np.uint8, buffer=block.buf)[:] = image
        response = requests.post(f"{spots_server.url}/analyze_image_shared_memory?width=1920&height=1080"
                                 f"&name={block.name}", data=b"ignored" * 1000)
        assert response.status_code == 200 and response.json()["result"] is True
        assert response.headers.get("Connection") == "close"
    finally:
        block.close()
        block.unlink()


def test_2_3_conflicting_framing_gets_aiohttps_plain_400(spots_server):
    with socket.create_connection(("127.0.0.1", spots_server.port)) as sock:
        sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(4096)
    assert b" 400 " in head.split(b"\r\n")[0]


def test_2_8_client_gone_mid_upload_is_counted_and_leaves_no_traceback(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
        sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                     .replace(b"Host: x", b"Host: x\r\nX-API-Key: " + KEY.encode()) + b"\0" * 5000)
    time.sleep(0.3)
    metrics = requests.get(f"{keyed.url}/metrics").text
    assert 'appliance_client_disconnects_total{phase="upload"} 1.0' in metrics
    assert "Traceback" not in keyed.log_text()


@pytest.mark.parametrize("peer, loopback", [(("127.0.0.1", 5), True), (("127.9.9.9", 5), True), (("::1", 5, 0, 0), True),
                                            (("::ffff:127.0.0.1", 5, 0, 0), True), (("10.0.0.7", 5), False),
                                            (("192.168.1.2", 5), False), (("::ffff:10.0.0.1", 5, 0, 0), False),
                                            (None, False)])
def test_6_1_shared_memory_is_only_for_loopback_peers(peer, loopback):
    from appliance.server.core import is_loopback

    assert is_loopback(peer) is loopback


def test_2_7_two_hundred_slow_uploads_do_not_slow_ping(keyed):
    """Slow loris: 200 connections trickling bodies; /ping p99 stays under 50 ms and RSS grows < 50 MiB."""
    def rss_kib() -> int:
        for line in open(f"/proc/{keyed.process.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    before = rss_kib()
    sockets = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", keyed.port))
            sock.sendall(b"POST /analyze_image HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode() +
                         b"\r\nContent-Length: 100000\r\n\r\n\xff")
            sockets.append(sock)
        latencies = []
        with requests.Session() as session:
            for _ in range(100):
                started = time.perf_counter()
                assert session.get(f"{keyed.url}/ping", timeout=2).status_code == 200
                latencies.append(time.perf_counter() - started)
        latencies.sort()
        assert latencies[98] < 0.05, f"ping p99 {latencies[98] * 1000:.1f} ms"
        assert rss_kib() - before < 50 * 1024
        # Every slow client gets its 408 after body_read_timeout_s (2 s here).
        sockets[0].settimeout(5)
        assert sockets[0].recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for sock in sockets:
            sock.close()


def test_5_9_wrong_keys_are_counted_without_a_peer_label(keyed):
    before = requests.get(f"{keyed.url}/metrics").text
    for _ in range(3):
        requests.post(f"{keyed.url}/analyze_image?api_key=nope", data=b"x")
    after = requests.get(f"{keyed.url}/metrics").text

    def count(text: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith("appliance_auth_failures_total "))
        return float(line.split()[1])

    assert count(after) - count(before) == 3
    assert "127.0.0.1" not in after


def test_7_3_stuck_hooks_turn_readiness_off(tmp_path, serve):
    project = slow_project(tmp_path / "p", 30, node={"timeout_s": 0.2}, limits={"max_stuck_hooks": 2})
    server = serve(project)
    body = png(part_image(False, 32, 32))
    first = requests.post(f"{server.url}/analyze_image", data=body).json()
    assert first["result"] is False and first["errors"][0]["message"] == "hook exceeded 0.2 s"
    assert 'appliance_hook_errors_total{node="h"} 1.0' in requests.get(f"{server.url}/metrics").text
    assert requests.get(f"{server.url}/health/ready").status_code == 200
    requests.post(f"{server.url}/analyze_image", data=body)
    status, message = error_of(requests.get(f"{server.url}/health/ready"))
    assert status == 503 and "2 Code hooks are stuck" in message
    assert requests.get(f"{server.url}/ping").status_code == 200


def test_8_1_a_full_queue_answers_503_at_once_with_retry_after(tmp_path, serve):
    import concurrent.futures

    project = slow_project(tmp_path / "p", 1.0, limits={"queue_depth": 2})
    server = serve(project)
    body = png(part_image(False, 16, 16))
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        busy = [pool.submit(requests.post, f"{server.url}/analyze_image", data=body) for _ in range(8)]
        time.sleep(0.3)
        started = time.perf_counter()
        rejected = requests.post(f"{server.url}/analyze_image", data=body)
        elapsed = time.perf_counter() - started
        answers = [f.result() for f in busy]
    status, message = error_of(rejected)
    assert (status, message) == (503, "busy: queue of 2 is full")
    assert elapsed < 0.1
    assert int(rejected.headers["Retry-After"]) >= 1
    assert sum(a.status_code == 200 for a in answers) >= 2
    assert 'appliance_rejected_requests_total{reason="queue_full"}' in requests.get(f"{server.url}/metrics").text


def test_10_sigterm_drains_requests_in_flight_and_exits_zero(tmp_path, serve):
    import concurrent.futures
    import signal

    project = slow_project(tmp_path / "p", 1.0, limits={"queue_depth": 8})
    server = serve(project)
    body = png(part_image(False, 16, 16))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(requests.post, f"{server.url}/analyze_image", data=body) for _ in range(4)]
        time.sleep(0.3)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        try:
            late = requests.post(f"{server.url}/analyze_image", data=body, timeout=5).status_code
        except requests.ConnectionError:
            late = "refused"
        assert [f.result().status_code for f in slow] == [200, 200, 200, 200]
    assert late in (503, "refused")
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < 2 + 1  # two rounds of 1 s hooks on 2 workers, plus margin
