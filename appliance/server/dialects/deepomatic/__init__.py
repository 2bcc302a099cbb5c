"""Deepomatic's API v0.7, as `deepomatic-api` 1.0.0 and the document's curl lines use it (docs/apis.md, Deepomatic).

Public recognition specs are the project's capabilities (objects, faces, text...) and the classify, detect and
faces models of its model store; private specs (integer ids) are the integrator's own label sets, each pointing
with `current_version_id` at a recognition version, i.e. one version of a stored model. An inference answers a
task id at once and runs in the background; the client polls the task. Errors are `{"error": "..."}` with a 4xx
status (the client retries 5xx for 60 s), except the core's 503 busy, which the client is right to retry.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from multidict import MultiDict
from pydantic import BaseModel

from appliance import frames
from appliance.config.apis import DeepomaticSettings
from appliance.config.project import Capabilities
from appliance.errors import (
    ApplianceError,
    BadRequest,
    ConfigError,
    NotFound,
    ServiceUnavailable,
)
from appliance.flow.runner import FlowRunner
from appliance.runtime.store import StoreError
from appliance.server import core
from appliance.server.auth import require_key
from appliance.server.core import ServerState
from appliance.server.dialects.base import Dialect
from appliance.server.dialects.deepomatic import inputs
from appliance.server.dialects.deepomatic.answer import Geometry, render_output
from appliance.server.dialects.deepomatic.registry import (
    MAX_DESCRIPTION,
    MAX_NAME,
    Registry,
    StoredModel,
    integer_id,
    iso,
    metadata_field,
    shown,
    text_field,
    validate_outputs,
)
from appliance.server.dialects.deepomatic.tasks import Task, Tasks
from appliance.server.image_urls import fetch_image
from appliance.server.inspection import Inspection
from appliance.server.render import Answer

log = logging.getLogger(__name__)

PREFIX = "/v0.7"
BOX_NODES = ("detect@1", "faces@1", "ocr@1")
MODEL_NODES = ("classify@1", "detect@1", "faces@1")
# How long a background inference waits for a free worker when the core answers busy, before failing the task.
BUSY_WAIT_S = 30.0


# How long GET /tasks/{id}/ waits for a pending task to finish before answering `pending`.
LONG_POLL_S = 2.0


@dataclass(frozen=True)
class Target:
    """What an inference runs: an installed capability, a stored model's current version, or a version."""

    capability: str | None = None
    model: str | None = None
    version: str | None = None
    roi: str = "NONE"
    labels: dict[str, tuple[int, str]] | None = None  # a private spec's labels by lower-case name


def _roi(runner: FlowRunner) -> str:
    """BBOX for a flow that places what it finds (detector, faces, text), NONE for a classification."""
    return "BBOX" if any(node.settings.type in BOX_NODES for node in runner.graph.nodes.values()) else "NONE"


def _spec_labels(spec: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {label["name"].strip().lower(): (label["id"], label["name"]) for label in spec["outputs"][0]["labels"]
            ["labels"]}


def _check_runs(spec: dict[str, Any], version_id: int, stored: StoredModel) -> None:
    """A spec can point at a version whose model has its roi and at least one of its labels."""
    output = spec["outputs"][0]["labels"]
    if output["roi"] != stored.roi:
        raise BadRequest(f"recognition version {version_id} runs {stored.model}@{stored.version}, a {stored.task} "
                         f"model with roi {stored.roi}; spec {spec['id']} has roi {output['roi']}")
    names = {label.name.strip().lower() for label in stored.labels}
    if not any(label["name"].strip().lower() in names for label in output["labels"]):
        known = ", ".join(label.name for label in stored.labels[:10])
        raise BadRequest(f"none of spec {spec['id']}'s labels is a label of {stored.model}@{stored.version} "
                         f"(labels are matched by name, without case; the model's labels: {known}"
                         f"{', ...' if len(stored.labels) > 10 else ''})")


def _brief(item: dict[str, Any]) -> dict[str, Any]:
    """An item of a list: without `outputs` (the document: "it is hidden when you access the list")."""
    return {key: value for key, value in item.items() if key != "outputs"}


def _page_numbers(request: web.Request) -> tuple[int, int]:
    numbers = []
    for name, default, low in (("offset", 0, 0), ("limit", 100, 1)):
        text = request.query.get(name)
        if text is None:
            numbers.append(default)
        elif text.strip().isdigit() and low <= int(text) <= (10**9 if name == "offset" else 1000):
            numbers.append(int(text))
        else:
            raise BadRequest(f"{name} must be an integer from {low}{' to 1000' if name == 'limit' else ''}, "
                             f"got {shown(text)}")
    return numbers[0], numbers[1]


def paginated(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    """DRF's limit/offset page with absolute `next`/`previous` URLs (the client follows them verbatim), and
    `prev` too (the client's ResourceList.prev() reads that key)."""
    offset, limit = _page_numbers(request)

    def link(start: int) -> str:
        query = MultiDict(request.query)
        query["offset"] = str(start)
        query["limit"] = str(limit)
        return str(request.url.with_query(query))

    following = link(offset + limit) if offset + limit < len(items) else None
    previous = link(max(0, offset - limit)) if offset > 0 else None
    return web.json_response({"count": len(items), "next": following, "previous": previous, "prev": previous,
                              "results": items[offset:offset + limit]})


class Deepomatic(Dialect):
    name = "deepomatic"
    settings_model = DeepomaticSettings
    prefixes = (PREFIX,)

    def __init__(self, state: ServerState, settings: BaseModel):
        super().__init__(state, settings)
        assert isinstance(settings, DeepomaticSettings)
        self.config: DeepomaticSettings = settings
        project = state.project
        self.registry = Registry(project.files.directory / ".deepomatic", project.runtime.store)
        self.tasks = Tasks(settings.max_tasks, settings.task_ttl_s)
        self.jobs: set[asyncio.Task] = set()
        self.started = time.time()

    async def start(self) -> None:
        self.registry.load()
        await self._scan_store()

    async def _scan_store(self) -> None:
        """Read the store's new or changed spec.yaml files in a thread (0.7 s for the repo's store the first time,
        1 ms when nothing changed), so that the handler's own reads of it find them cached."""
        await asyncio.get_running_loop().run_in_executor(None, self.registry.stored_models)

    async def stop(self) -> None:
        for job in list(self.jobs):
            job.cancel()
        if self.jobs:
            await asyncio.gather(*self.jobs, return_exceptions=True)

    # --- shape ---------------------------------------------------------------------------------------------

    def render_error(self, error: ApplianceError) -> web.StreamResponse:
        return web.json_response({"error": error.message}, status=error.status, headers=error.headers)

    def endpoints(self) -> list[str]:
        return sorted({route.path.rstrip("/") for route in self.routes() if "{tail" not in route.path})

    def routes(self) -> list[web.RouteDef]:
        routes: list[web.RouteDef] = []

        def add(method: str, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
            # Both forms, never a redirect: the client adds a slash, the document's curl lines do not.
            for form in (PREFIX + path, PREFIX + path + "/"):
                extra = {"expect_handler": core.expect_continue} if method in ("POST", "PUT", "PATCH") else {}
                routes.append(web.route(method, form, handler, **extra))

        add("GET", "/recognition/public", self.list_public)
        add("GET", "/recognition/public/{spec_id}", self.get_public)
        add("POST", "/recognition/public/{spec_id}/inference", self.infer_public)
        add("GET", "/recognition/specs", self.list_specs)
        add("POST", "/recognition/specs", self.create_spec)
        add("GET", "/recognition/specs/{spec_id}", self.get_spec)
        add("PATCH", "/recognition/specs/{spec_id}", self.patch_spec)
        add("PUT", "/recognition/specs/{spec_id}", self.put_spec)
        add("DELETE", "/recognition/specs/{spec_id}", self.delete_spec)
        add("GET", "/recognition/specs/{spec_id}/versions", self.spec_versions)
        add("POST", "/recognition/specs/{spec_id}/inference", self.infer_spec)
        add("GET", "/recognition/versions", self.list_versions)
        add("POST", "/recognition/versions", self.create_version)
        add("GET", "/recognition/versions/{version_id}", self.get_version)
        add("DELETE", "/recognition/versions/{version_id}", self.delete_version)
        add("POST", "/recognition/versions/{version_id}/inference", self.infer_version)
        add("GET", "/tasks", self.list_tasks)
        add("GET", "/tasks/{task_id}", self.get_task)
        for resource in ("networks", "accounts"):
            for form in (f"{PREFIX}/{resource}", f"{PREFIX}/{resource}/{{tail:.*}}"):
                routes.append(web.route("*", form, self.not_served))
        return routes

    def _auth(self, request: web.Request) -> None:
        """X-API-KEY, as the client and the document send it (X-APP-ID is accepted and ignored)."""
        require_key(request, {}, self.state.project.api_keys)

    async def not_served(self, request: web.Request) -> web.Response:
        self._auth(request)
        resource = request.path[len(PREFIX) + 1:].split("/")[0]
        raise NotFound(f"{resource} are not served by the appliance: its models come from the project's model store "
                       "(GET /v0.7/recognition/versions/ lists them)")

    # --- public specs ----------------------------------------------------------------------------------------

    def _capability_spec(self, name: str, runner: FlowRunner) -> tuple[dict[str, Any], Target]:
        nodes = list(runner.graph.nodes.values())
        roi = _roi(runner)
        labels: list[dict[str, Any]] = []
        exclusive = roi == "NONE"
        for node in nodes:
            loaded = getattr(getattr(node, "slot", None), "current", None)
            if node.settings.type in MODEL_NODES and loaded is not None:
                labels = [{"id": label.id, "name": label.name} for label in loaded.spec.labels]
                exclusive = loaded.spec.exclusive
                break
        flow = self.state.project.files.capability_flows.get(name)
        description = flow.doc.data.get("description", "") if flow is not None else ""
        spec = {"id": name, "name": name, "description": str(description or ""), "update_date": iso(self.started),
                "metadata": {}, "outputs": [{"labels": {"roi": roi, "exclusive": exclusive, "labels": labels}}]}
        return spec, Target(capability=name, roi=roi)

    def public_specs(self) -> dict[str, tuple[dict[str, Any], Target]]:
        """Installed capabilities first, then the store's classify, detect and faces models by name (a model
        named like a capability is served under the capability's name only)."""
        found = {name: self._capability_spec(name, runner)
                 for name, runner in self.state.project.capabilities.items() if not name.startswith("model:")}
        models = sorted({stored.model for stored in self.registry.stored_models().values()})
        for model in models:
            stored = self.registry.current_model(model)
            if model in found or stored is None:
                continue
            spec = {"id": model, "name": model, "description": f"stored model {model} ({stored.task}), the version "
                    "the store's current pointer names", "update_date": iso(stored.modified), "metadata": {},
                    "outputs": stored.outputs()}
            found[model] = (spec, Target(model=model, roi=stored.roi))
        return found

    def _public(self, spec_id: str) -> tuple[dict[str, Any], Target]:
        specs = self.public_specs()
        if spec_id in self.state.project.capabilities:
            problem = self.state.project.capability_problem(spec_id)
            if problem is not None:
                raise NotFound(f"capability '{spec_id}' cannot answer on this appliance: {problem}")
        if spec_id not in specs:
            if spec_id in Capabilities.model_fields:
                raise NotFound(f"capability '{spec_id}' is not installed on this appliance (project.yaml "
                               f"capabilities:); public specs: {', '.join(specs) or 'none'}")
            raise NotFound(f"no public recognition spec '{spec_id[:100]}'; public specs: {', '.join(specs) or 'none'}")
        return specs[spec_id]

    async def list_public(self, request: web.Request) -> web.Response:
        self._auth(request)
        await self._scan_store()
        results = [_brief(spec) for spec, _ in self.public_specs().values()]
        return paginated(request, results)

    async def get_public(self, request: web.Request) -> web.Response:
        self._auth(request)
        await self._scan_store()
        return web.json_response(self._public(request.match_info["spec_id"])[0])

    async def infer_public(self, request: web.Request) -> web.Response:
        self._auth(request)
        spec_id = request.match_info["spec_id"]
        runner = self.state.project.capabilities.get(spec_id)
        if runner is not None and not spec_id.startswith("model:"):
            # The hot path: a capability needs neither the store's scan nor its labels, only its roi.
            problem = self.state.project.capability_problem(spec_id)
            if problem is not None:
                raise NotFound(f"capability '{spec_id}' cannot answer on this appliance: {problem}")
            return await self._inference(request, Target(capability=spec_id, roi=_roi(runner)))
        await self._scan_store()
        return await self._inference(request, self._public(spec_id)[1])

    # --- private specs ---------------------------------------------------------------------------------------

    def _spec(self, request: web.Request) -> dict[str, Any]:
        text = request.match_info["spec_id"]
        spec_id = int(text) if text.isdigit() else None
        if spec_id is None or spec_id not in self.registry.specs:
            raise NotFound(f"no recognition spec {text[:100]!r} (private specs have integer ids; public specs are "
                           "under /v0.7/recognition/public/)")
        return self.registry.specs[spec_id]

    async def list_specs(self, request: web.Request) -> web.Response:
        self._auth(request)
        results = [_brief(spec) for _, spec in sorted(self.registry.specs.items())]
        return paginated(request, results)

    async def create_spec(self, request: web.Request) -> web.Response:
        self._auth(request)
        fields = await inputs.read_fields(request, self.state.project.config.limits)
        unknown = sorted(set(fields) - {"name", "description", "metadata", "outputs"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; fields: name, description, metadata, outputs")
        name = text_field(fields, "name", required=True, limit=MAX_NAME)
        description = text_field(fields, "description", required=False, limit=MAX_DESCRIPTION) or ""
        metadata = metadata_field(fields["metadata"]) if fields.get("metadata") is not None else {}
        if "outputs" not in fields:
            raise BadRequest("outputs is required")
        outputs = fields["outputs"]
        if isinstance(outputs, str):
            outputs = inputs.parse_fields(outputs.encode(), "application/json")  # a form field with JSON text
        assert name is not None
        spec = self.registry.create_spec(name, description, metadata, validate_outputs(outputs))
        return web.json_response(spec, status=201)

    async def get_spec(self, request: web.Request) -> web.Response:
        self._auth(request)
        return web.json_response(self._spec(request))

    async def patch_spec(self, request: web.Request) -> web.Response:
        return await self._update(request, replace=False)

    async def put_spec(self, request: web.Request) -> web.Response:
        return await self._update(request, replace=True)

    async def _update(self, request: web.Request, *, replace: bool) -> web.Response:
        """PATCH changes the fields given; PUT replaces name, description, metadata and current_version_id (the
        ones not given get their defaults). outputs cannot change (the document: "Other values are immutable")."""
        self._auth(request)
        spec = self._spec(request)
        fields = await inputs.read_fields(request, self.state.project.config.limits)
        await self._scan_store()
        fields.pop("id", None)
        fields.pop("update_date", None)
        if "outputs" in fields and fields.pop("outputs") != spec["outputs"]:
            raise BadRequest("outputs cannot be changed; create a new spec for other labels")
        unknown = sorted(set(fields) - {"name", "description", "metadata", "current_version_id"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; fields: name, description, metadata, current_version_id")
        changes: dict[str, Any] = {}
        if replace or "name" in fields:
            changes["name"] = text_field(fields, "name", required=True, limit=MAX_NAME)
        if replace or "description" in fields:
            changes["description"] = text_field(fields, "description", required=False, limit=MAX_DESCRIPTION) or ""
        if replace or "metadata" in fields:
            changes["metadata"] = metadata_field(fields["metadata"]) if fields.get("metadata") is not None else {}
        if replace or "current_version_id" in fields:
            version_id = integer_id(fields.get("current_version_id"), "current_version_id")
            if version_id is not None:
                found = self.registry.version(version_id)
                if found is None:
                    raise BadRequest(f"current_version_id {version_id}: no such recognition version; "
                                     "GET /v0.7/recognition/versions/ lists them")
                stored, record = found
                if record is not None and record["spec_id"] != spec["id"]:
                    raise BadRequest(f"recognition version {version_id} belongs to spec {record['spec_id']}")
                _check_runs(spec, version_id, stored)
            changes["current_version_id"] = version_id
        spec.update(changes, update_date=iso(time.time()))
        self.registry.save()
        return web.json_response(spec)

    async def delete_spec(self, request: web.Request) -> web.Response:
        self._auth(request)
        self.registry.delete_spec(self._spec(request)["id"])
        return web.Response(status=204)

    async def spec_versions(self, request: web.Request) -> web.Response:
        """The versions made for the spec, and the store version it points at."""
        self._auth(request)
        await self._scan_store()
        spec = self._spec(request)
        results = [_brief(self.registry.version_json(version_id, stored, record))
                   for version_id, stored, record in self.registry.all_versions()
                   if (record is not None and record["spec_id"] == spec["id"])
                   or version_id == spec["current_version_id"]]
        return paginated(request, results)

    async def infer_spec(self, request: web.Request) -> web.Response:
        self._auth(request)
        await self._scan_store()
        spec = self._spec(request)
        version_id = spec["current_version_id"]
        if version_id is None:
            raise BadRequest(f"spec {spec['id']} has no current version (current_version_id is null); set it with "
                             "PATCH to one of GET /v0.7/recognition/versions/")
        found = self.registry.version(version_id)
        if found is None:
            raise NotFound(f"spec {spec['id']}'s version {version_id} is no longer in the model store")
        stored, _ = found
        target = Target(model=stored.model, version=stored.version, roi=stored.roi, labels=_spec_labels(spec))
        return await self._inference(request, target)

    # --- versions --------------------------------------------------------------------------------------------

    def _version(self, request: web.Request) -> tuple[int, StoredModel, dict[str, Any] | None]:
        text = request.match_info["version_id"]
        version_id = int(text) if text.isdigit() else None
        found = self.registry.version(version_id) if version_id is not None else None
        if version_id is None or found is None:
            raise NotFound(f"no recognition version {text[:100]!r}; GET /v0.7/recognition/versions/ lists them")
        return version_id, found[0], found[1]

    async def list_versions(self, request: web.Request) -> web.Response:
        self._auth(request)
        await self._scan_store()
        results = [_brief(self.registry.version_json(*row)) for row in self.registry.all_versions()]
        return paginated(request, results)

    async def get_version(self, request: web.Request) -> web.Response:
        self._auth(request)
        await self._scan_store()
        return web.json_response(self.registry.version_json(*self._version(request)))

    async def create_version(self, request: web.Request) -> web.Response:
        """A version of a spec from one of the store's model versions (`network_id`: a store version's id, or
        "model" or "model@version"); post_processings must be of the model's kind and are kept as given."""
        self._auth(request)
        await self._scan_store()
        fields = await inputs.read_fields(request, self.state.project.config.limits)
        unknown = sorted(set(fields) - {"spec_id", "network_id", "post_processings"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}; fields: spec_id, network_id, post_processings")
        for required in ("spec_id", "network_id"):
            if fields.get(required) is None:
                raise BadRequest(f"{required} is required")
        spec_id = integer_id(fields["spec_id"], "spec_id")
        spec = self.registry.specs.get(spec_id) if spec_id is not None else None
        if spec is None:
            raise BadRequest(f"spec_id {shown(fields['spec_id'])}: no such private recognition spec")
        network = self.registry.network(fields["network_id"])
        stored = self.registry.stored_models()[network]
        post = fields.get("post_processings", [])
        if isinstance(post, str):
            post = inputs.parse_fields(b'{"p": ' + post.encode() + b"}", "application/json")["p"]
        kind = "classification" if stored.task == "classify" else "detection"
        if not isinstance(post, list) or any(not isinstance(p, dict) or set(p) != {kind} for p in post):
            raise BadRequest(f"post_processings must be a list of {{\"{kind}\": {{...}}}} for {stored.model}, a "
                             f"{stored.task} model; the model's own post-processing runs, these are kept as given")
        _check_runs(spec, network, stored)
        version_id = self.registry.create_version(spec["id"], network, post)
        return web.json_response(self.registry.version_json(version_id, stored, self.registry.versions[version_id]),
                                 status=201)

    async def delete_version(self, request: web.Request) -> web.Response:
        self._auth(request)
        await self._scan_store()
        version_id, _, record = self._version(request)
        if record is None:
            raise BadRequest(f"recognition version {version_id} is a version of the model store; remove it from "
                             "the store, not over the API")
        users = [spec_id for spec_id, spec in self.registry.specs.items() if spec["current_version_id"] == version_id]
        if users:
            raise BadRequest(f"recognition version {version_id} is the current version of spec {users[0]}")
        del self.registry.versions[version_id]
        self.registry.save()
        return web.Response(status=204)

    async def infer_version(self, request: web.Request) -> web.Response:
        self._auth(request)
        await self._scan_store()
        _, stored, record = self._version(request)
        spec = self.registry.specs.get(record["spec_id"]) if record is not None else None
        target = Target(model=stored.model, version=stored.version, roi=stored.roi,
                        labels=_spec_labels(spec) if spec is not None else None)
        return await self._inference(request, target)

    # --- tasks -----------------------------------------------------------------------------------------------

    async def get_task(self, request: web.Request) -> web.Response:
        self._auth(request)
        task = self.tasks.get(request.match_info["task_id"])
        if task is None:
            raise NotFound(f"no task {request.match_info['task_id'][:100]!r} (tasks are kept for "
                           f"{self.config.task_ttl_s:g} s, the newest {self.config.max_tasks})")
        if task.status == "pending" and not self.state.draining:
            # A short long-poll: the client's first poll comes right after the submit and would otherwise see
            # `pending` and sleep 50-100 ms; held here, it returns the moment the task is done (the client's
            # own request timeout is 8 s).
            try:
                await asyncio.wait_for(task.finished.wait(), LONG_POLL_S)
            except TimeoutError:
                pass
        return web.json_response(task.json())

    async def list_tasks(self, request: web.Request) -> web.Response:
        self._auth(request)
        wanted = [part for value in request.query.getall("task_ids", []) for part in value.split(",") if part]
        if not wanted:
            return paginated(request, [task.json() for task in self.tasks.newest_first()])
        found = {task_id: self.tasks.get(task_id) for task_id in wanted}
        missing = [task_id for task_id, task in found.items() if task is None]
        if missing:
            raise NotFound(f"no task {', '.join(repr(m[:100]) for m in missing[:5])} (tasks are kept for "
                           f"{self.config.task_ttl_s:g} s, the newest {self.config.max_tasks})")
        return paginated(request, [task.json() for task in found.values() if task is not None])

    # --- inference -------------------------------------------------------------------------------------------

    async def _inference(self, request: web.Request, target: Target) -> web.Response:
        state = self.state
        core.admit(state)
        pending = sum(1 for job in self.jobs if not job.done())
        if pending >= state.queue_depth + state.slots:
            state.metrics.rejected.labels("queue_full").inc()
            retry = max(1, math.ceil(pending * state.service_seconds / state.slots))
            raise ServiceUnavailable(f"busy: {pending} inference tasks are waiting", headers={"Retry-After": str(retry)})
        parsed = await inputs.read_inference(request, state.project.config.limits, tuple(self.config.url_hosts),
                                             self.config.max_inputs)
        task = self.tasks.new()
        job = asyncio.create_task(self._run(task, target, parsed))
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)
        return web.json_response({"task_id": task.id})

    async def _run(self, task: Task, target: Target, parsed: inputs.InferenceRequest) -> None:
        where = ""
        try:
            capability = await self._capability(target)
            outputs = []
            for source in parsed.inputs:
                where = source.where
                data = source.data if source.data is not None else await self._fetch(source)
                outputs.append(await self._inspect(capability, target, parsed, source, data))
            task.succeed({"outputs": outputs})
        except ApplianceError as error:
            task.fail(f"{where}: {error.message}" if where else error.message)
        except (ConfigError, StoreError) as error:
            task.fail(str(error))
        except asyncio.CancelledError:
            task.fail("cancelled: the appliance is shutting down")
            raise
        except Exception:
            log.exception("deepomatic: inference task %s failed", task.id)
            task.fail("internal error; the appliance log has the details")

    async def _capability(self, target: Target) -> str:
        """The capability key to inspect with; a stored model's flow is compiled on first use, in a thread of
        its own (never a worker that frames are waiting for)."""
        if target.capability is not None:
            return target.capability
        assert target.model is not None
        loop = asyncio.get_running_loop()
        project = self.state.project
        return await loop.run_in_executor(None, project.model_capability, target.model, target.version)

    async def _fetch(self, source: inputs.ImageSource) -> bytes:
        assert source.url is not None
        return await fetch_image(source.url, timeout_s=self.config.url_timeout_s,
                                 limit=self.state.project.config.limits.body_bytes)

    async def _inspect(self, capability: str, target: Target, parsed: inputs.InferenceRequest,
                       source: inputs.ImageSource, data: bytes) -> dict[str, Any]:
        state = self.state
        project = state.project
        limits, color = project.config.limits, project.config.color
        geometry: list[Geometry] = []
        result: list[dict[str, Any]] = []
        runner = project.capabilities.get(capability)

        def decode() -> frames.Frame:
            frame = frames.decode_image(data, max_frame_pixels=limits.max_frame_pixels, color=color)
            height, width = frame.image.shape[:2]
            if source.bbox is None:
                geometry.append(Geometry(width, height))
                return frame
            xmin, ymin, xmax, ymax = source.bbox
            left, top = min(width - 1, int(xmin * width)), min(height - 1, int(ymin * height))
            right, bottom = max(left + 1, math.ceil(xmax * width)), max(top + 1, math.ceil(ymax * height))
            geometry.append(Geometry(width, height, left, top))
            return frames.Frame(np.ascontiguousarray(frame.image[top:bottom, left:right]), frame.source,
                                frame.warnings)

        def render(inspection: Inspection) -> Answer:
            result.append(render_output(inspection, roi=target.roi, labels=target.labels,
                                        show_discarded=parsed.show_discarded, max_predictions=parsed.max_predictions,
                                        geometry=geometry[0], runner=runner))
            return Answer(b"", "application/json")

        options = {"max_labels": max(1, min(parsed.max_predictions, 1000))}
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            try:
                await core.inspect(None, state, decode, render, options=options, capability=capability)
                return result[0]
            except ServiceUnavailable as busy:
                # Queue full or its deadline: the task waits its turn (it stays pending) rather than failing.
                if state.draining or not state.ready or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(float(busy.headers.get("Retry-After", "1")))
