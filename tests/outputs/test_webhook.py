"""The webhook output against a real aiohttp server on loopback: the JSON or templated body, headers from the
environment, a non-2xx answer counted as failed and sent again, order kept; `check` with places."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from aiohttp import web

from appliance.errors import ConfigError
from appliance.project import Project
from tests.conftest import free_port, start_server, wait_until_sent, write_project
from tests.outputs import FLOW, VERDICT, analyse


class Mes:
    """An aiohttp server on its own thread that records each request; `failing` answers 503 that many times."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.failing = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.failing > 0:
            self.failing -= 1
            return web.Response(status=503, text="busy")
        self.requests.append((request.method, request.path, dict(request.headers), body))
        return web.Response(status=201 if request.method == "PUT" else 200)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> Mes:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def wait_for(self, count: int, seconds: float = 20) -> list:
        deadline = time.monotonic() + seconds
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.requests)


@pytest.fixture
def mes() -> Iterator[Mes]:
    server = Mes().start()
    yield server
    server.stop()


def test_json_posts_in_order_with_headers_from_the_environment(tmp_path, mes):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, name="cell-3", outputs=[
        {"type": "webhook", "name": "mes", "url": f"http://127.0.0.1:{mes.port}/results",
         "headers": {"Authorization": {"env": "TEST_MES_TOKEN"}, "X-Line": "3"}}])
    server = start_server(project, env={"TEST_MES_TOKEN": "Bearer t0ken"})
    try:
        for index, verdict in enumerate(["ok", "ng", "ok"]):
            assert analyse(server.url, verdict, f"w{index}").status_code == 200
        got = mes.wait_for(3)
        assert [(method, path) for method, path, _, _ in got] == [("POST", "/results")] * 3
        assert all(h["Authorization"] == "Bearer t0ken" and h["X-Line"] == "3" and
                   h["Content-Type"] == "application/json" for _, _, h, _ in got)
        import json
        bodies = [json.loads(body) for *_, body in got]
        assert [(b["request_id"], b["result"], b["project"]) for b in bodies] == [
            ("w0", True, "cell-3"), ("w1", False, "cell-3"), ("w2", True, "cell-3")]
        assert "t0ken" not in server.log_text()
    finally:
        server.stop()


def test_a_non_2xx_answer_is_failed_and_sent_again_in_order(tmp_path, mes):
    mes.failing = 2
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "webhook", "name": "mes", "url": f"http://127.0.0.1:{mes.port}/r", "method": "PUT",
         "template": "$verdict $request_id $counter"}])
    server = start_server(project)
    try:
        for index, verdict in enumerate(["ng", "ok", "ok", "ng"]):
            assert analyse(server.url, verdict, f"t{index}").status_code == 200
        got = mes.wait_for(4)
        assert [body.decode() for *_, body in got] == ["NG t0 1", "OK t1 2", "OK t2 3", "NG t3 4"]
        assert all(method == "PUT" and h["Content-Type"] == "text/plain; charset=utf-8" for method, _, h, _ in got)
        wait_until_sent(server, "mes", 4)
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'appliance_output_messages_total{outcome="failed",output="mes"} 2.0' in metrics
        assert 'appliance_output_messages_total{outcome="sent",output="mes"} 4.0' in metrics
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["mes"]
        assert (health["sent"], health["failed"], health["last_error"]) == (4, 2, None)
    finally:
        server.stop()


def test_a_dead_mes_never_delays_the_answer(tmp_path):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "webhook", "name": "mes", "url": f"http://127.0.0.1:{free_port()}/r"}])
    server = start_server(project)
    try:
        for index in range(10):
            assert analyse(server.url, "ok", f"d{index}").status_code == 200
        health = requests.get(f"{server.url}/health", timeout=10).json()["outputs"]["mes"]
        assert health["failed"] >= 1 and health["sent"] == 0 and "ClientConnectorError" in health["last_error"]
    finally:
        server.stop()


def test_check_locates_a_bad_url_template_and_header(tmp_path):
    project = write_project(tmp_path / "p", FLOW, hooks={"verdict": VERDICT}, outputs=[
        {"type": "webhook", "url": "ftp://mes/results"},
        {"type": "webhook", "url": "http://mes/r", "template": "$verdict $colour"},
        {"type": "webhook", "url": "http://mes/r", "headers": {"Bad Header": "x"}},
        {"type": "webhook", "url": "http://mes/r", "method": "GET"}])
    with pytest.raises(ConfigError) as refused:
        Project.load(project)
    problems = "\n".join(refused.value.problems)
    for index, text in enumerate(["webhook url 'ftp://mes/results'", "unknown placeholder $colour",
                                  "'Bad Header' is not a valid HTTP header name", "method"]):
        assert f"outputs[{index}]" in problems and text in problems, (index, text, problems)
