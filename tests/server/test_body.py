"""Form bodies as the vendor APIs' clients send them, split by server/body.py's multipart parser."""

from __future__ import annotations

import pytest
import requests

from appliance.errors import BadRequest
from appliance.server.body import split_multipart


def prepared(**kwargs) -> tuple[bytes, str]:  # type: ignore[no-untyped-def]
    request = requests.Request("POST", "http://127.0.0.1/", **kwargs).prepare()
    assert isinstance(request.body, bytes)
    return request.body, request.headers["Content-Type"]


def test_a_requests_form_with_fields_and_a_file_is_split_in_order():
    image = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n"
    body, content_type = prepared(data={"apikey": "k", "type": "objects"}, files={"file": ("part.jpg", image)})
    assert split_multipart(body, content_type) == [("apikey", None, b"k"), ("type", None, b"objects"),
                                                   ("file", "part.jpg", image)]


def test_the_deepomatic_clients_part_names_and_an_empty_part():
    body, content_type = prepared(files={"inputs[0]image.source": ("inputs[0]image.source", b"\xff\xd8jpeg"),
                                         "inputs[0]image.crop_uniform_background": (None, b"False"),
                                         "empty": (None, b"")})
    assert split_multipart(body, content_type) == [
        ("inputs[0]image.source", "inputs[0]image.source", b"\xff\xd8jpeg"),
        ("inputs[0]image.crop_uniform_background", None, b"False"), ("empty", None, b"")]


def test_a_quoted_boundary_escaped_quotes_in_a_name_and_a_part_without_headers():
    body = (b'preamble\r\n--b 1\r\nContent-Disposition: form-data; name="say \\"hi\\""\r\n\r\nhello\r\n'
            b"--b 1\r\n\r\nno headers\r\n--b 1--\r\nepilogue")
    assert split_multipart(body, 'multipart/form-data; boundary="b 1"') == [('say "hi"', None, b"hello"),
                                                                           ("", None, b"no headers")]


@pytest.mark.parametrize("body, content_type, message", [
    (b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nvalue", "multipart/form-data; boundary=x",
     "multipart body is cut short: a part has no end boundary"),
    (b"--x\r\n", "multipart/form-data; boundary=x", "multipart body is cut short: a part has no end boundary"),
    (b"plain text", "multipart/form-data; boundary=x", "multipart body does not contain its boundary"),
    (b"--x--", "multipart/form-data", "multipart body without a boundary in its Content-Type"),
])
def test_a_broken_multipart_body_is_a_bad_request(body, content_type, message):
    with pytest.raises(BadRequest) as refused:
        split_multipart(body, content_type)
    assert refused.value.message == message
