"""The dialect architecture: `apis`, `api_keys`, `api_settings` and `capabilities` in project.yaml, errors in the
shape of the route's API, the `api` label of metrics and logs. In-process, through aiohttp's test client."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from appliance.errors import ConfigError, NotFound
from appliance.project import Project
from appliance.server.app import create_app
from appliance.server.core import STATE
from appliance.server.dialects import DIALECTS
from tests.conftest import write_project

FLIP = {"nodes": {"f": {"type": "flip@1", "direction": "both"}}}
# A flow that reports the one key the project's hook reads: the capability flows are told apart by their answer.
CAPABILITY_HOOK = "def main(context, form):\n    context['which'] = form['name']\n"


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Project.load(folder)
    return caught.value.problems


def served(project_dir: Path, check) -> None:  # type: ignore[no-untyped-def]
    """Run ``check(client, state)`` against the project's app, ready as `appliance serve` makes it."""
    async def run() -> None:
        project = Project.load(project_dir)
        project.prepare()
        app = create_app(project, workers=2)
        app[STATE].ready = True
        async with TestClient(TestServer(app)) as client:
            await check(client, app[STATE])

    asyncio.run(run())


def test_an_unknown_api_and_settings_for_an_api_not_served_are_located(tmp_path):
    project = write_project(tmp_path, FLIP, apis=["pekat", "pekta"], api_settings={"raypack": {}})
    found = problems_of(project)
    known = ", ".join(DIALECTS)
    assert any(p.endswith(f"apis: unknown API 'pekta'; known: {known}") and "project.yaml:" in p for p in found)


def test_api_settings_are_checked_by_the_api_and_only_for_apis_served(tmp_path):
    project = write_project(tmp_path, FLIP, api_settings={"raypack": {}})
    (problem,) = problems_of(project)
    assert problem.endswith("api_settings.raypack: settings for 'raypack', which `apis` does not list (pekat)")
    project = write_project(tmp_path, FLIP, api_settings={"pekat": {"colour": 1}})
    (problem,) = problems_of(project)
    assert problem.endswith("api_settings.pekat.colour: unknown key")


def test_a_capability_flow_is_validated_with_its_place(tmp_path):
    project = write_project(tmp_path, FLIP, capabilities={"objects": "nowhere.yaml", "food": {"nodes": {
        "x": {"type": "flip@1", "direction": "sideways"}}}})
    found = problems_of(project)
    assert any("capabilities.objects: flow file" in p and "nowhere.yaml not found" in p for p in found)
    assert any("project.yaml:" in p and "capabilities.food.nodes.x.direction:" in p for p in found)
    project = write_project(tmp_path, FLIP, capabilities={"object": "flow.yaml"})
    (problem,) = problems_of(project)
    assert problem.endswith("capabilities.object: unknown key (did you mean 'objects'?)")


def test_each_capability_runs_its_own_flow(tmp_path):
    def hook_flow(name: str) -> dict:
        return {"nodes": {"h": {"type": "code@1", "module": "which", "form": {"name": name}}}}

    project = write_project(tmp_path, hook_flow("main"), hooks={"which": CAPABILITY_HOOK},
                            capabilities={"objects": hook_flow("objects"), "text": hook_flow("text")})
    loaded = Project.load(project)
    assert sorted(loaded.capabilities) == ["objects", "text"]
    assert loaded.node_count == 3
    loaded.prepare()
    from appliance import frames

    frame = frames.raw_frame(bytes(12), 2, 2, bayer=False)
    assert loaded.inspect(frame, "")["which"] == "main"
    assert loaded.inspect(frame, "", capability="text")["which"] == "text"
    loaded.close()


def test_named_keys_each_open_the_api_and_two_different_keys_in_one_request_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MES_KEY", "mes-secret")
    project = write_project(tmp_path, FLIP, api_key="line-secret", api_keys={"mes": {"env": "TEST_MES_KEY"}})
    png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()

    async def check(client: TestClient, state) -> None:  # type: ignore[no-untyped-def]
        for key in ("line-secret", "mes-secret"):
            response = await client.post("/analyze_image", data=png, headers={"X-API-Key": key})
            assert response.status == 200, await response.text()
        response = await client.post("/analyze_image?api_key=mes-secret", data=png,
                                     headers={"X-API-Key": "line-secret"})
        assert (response.status, await response.json()) == (
            401, {"status": 401, "message": "wrong API key", "data": None})

    served(project, check)


def test_errors_on_an_unknown_path_name_every_endpoint_in_the_first_apis_shape(tmp_path):
    project = write_project(tmp_path, FLIP)

    async def check(client: TestClient, state) -> None:  # type: ignore[no-untyped-def]
        response = await client.get("/nope")
        body = await response.json()
        assert response.status == 404 and body["data"] is None
        assert body["message"].startswith("no endpoint at /nope; endpoints: /analyze_image, ")
        assert "/health" in body["message"] and "/v0.7" not in body["message"]
        response = await client.get("/analyze_image")
        assert response.status == 405 and (await response.json())["message"] == (
            "method GET is not allowed on /analyze_image; use POST")

    served(project, check)


@pytest.mark.parametrize("name", [name for name, dialect in DIALECTS.items() if dialect.prefixes])
def test_an_unknown_path_under_an_apis_prefix_is_answered_in_that_apis_shape(tmp_path, name):
    project = write_project(tmp_path, FLIP, apis=list(DIALECTS))

    async def check(client: TestClient, state) -> None:  # type: ignore[no-untyped-def]
        dialect = state.dialects[name]
        path = dialect.prefixes[0].rstrip("/") + "/no-such-thing/"
        response = await client.get(path)
        expected = dialect.error_response(dialect.not_found(type("R", (), {"path": path})()))
        assert response.status == expected.status
        assert await response.read() == expected.body

    served(project, check)


def test_every_api_is_mounted_and_its_routes_belong_to_it_in_metrics_and_logs(tmp_path, caplog):
    project = write_project(tmp_path, FLIP, apis=list(DIALECTS))
    png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()

    async def check(client: TestClient, state) -> None:  # type: ignore[no-untyped-def]
        assert list(state.dialects) == list(DIALECTS)
        assert (await client.post("/analyze_image", data=png)).status == 200
        assert (await client.get("/health")).status == 200
        metrics = await (await client.get("/metrics")).text()
        assert 'appliance_requests_total{api="pekat",code="200",endpoint="/analyze_image"} 1.0' in metrics
        assert 'appliance_requests_total{api="core",code="200",endpoint="/health"} 1.0' in metrics

    with caplog.at_level("DEBUG", logger="appliance.server"):
        served(project, check)
    apis = {getattr(record, "endpoint", None): getattr(record, "api", None) for record in caplog.records}
    assert apis["/analyze_image"] == "pekat" and apis["/health"] == "core"


def test_an_error_renders_through_the_dialect_of_its_route(tmp_path):
    """The core raises the same NotFound; each dialect renders it in its own shape, never the core's."""
    project = write_project(tmp_path, FLIP, apis=list(DIALECTS))

    async def check(client: TestClient, state) -> None:  # type: ignore[no-untyped-def]
        shapes = {}
        for name, dialect in state.dialects.items():
            answer = dialect.error_response(NotFound("no frame"))
            shapes[name] = (answer.status, json.loads(answer.body) if answer.body else None)
        assert shapes["pekat"] == (404, {"status": 404, "message": "no frame", "data": None})
        # KServe's shape is Deepomatic's by both APIs' definitions: {"error": "..."}.
        assert shapes["kserve"] == shapes["deepomatic"] == (404, {"error": "no frame"})
        distinct = [shape for name, shape in shapes.items() if name != "kserve"]
        assert len({json.dumps(shape[1], sort_keys=True) for shape in distinct}) == len(distinct)

    served(project, check)
