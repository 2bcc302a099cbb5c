"""A running project: its compiled flow and the synchronous inspection of one frame.

`Project.inspect` is the whole data path after decoding (frame -> context -> flow), called from a
worker thread; the server owns everything about HTTP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config.flow import FlowSpec
from appliance.config.loader import ProjectFiles, _display, load_project_files, sorted_problems
from appliance.config.source import YamlDocument
from appliance.context import Context, finish
from appliance.errors import ConfigError, DeviceUnavailable
from appliance.flow.graph import FlowGraph, compile_flow
from appliance.flow.runner import FlowRunner
from appliance.nodes import NODE_TYPES
from appliance.nodes.base import Node, NodeEnvironment
from appliance.runtime.devices import place
from appliance.runtime.models import Runtime, RuntimeOptions, default_cache_dir
from appliance.runtime.spec import read_spec
from appliance.runtime.store import StoreError, read_current, resolve_version

if TYPE_CHECKING:
    from appliance.frames import Frame

log = logging.getLogger(__name__)

# project.yaml settings the running server fixed when it started (its socket, routes, keys, device, model
# store): a reload keeps their old values and says that they need a restart.
RESTART_SETTINGS = ("name", "host", "port", "api_key", "api_keys", "apis", "api_settings", "firmware_profile",
                    "models_dir", "cache_dir", "metrics", "console")
# The same for limits: the body size aiohttp enforces, the drain, and the Code hooks' thread pool.
RESTART_LIMITS = ("max_frame_pixels", "max_body_bytes", "drain_timeout_s", "max_stuck_hooks")

# A stored model's task -> the node type (and settings) that runs it alone (Project.model_capability).
TASK_NODES: dict[str, tuple[str, dict[str, Any]]] = {
    "classify": ("classify@1", {"show_discarded": True, "max_predictions": 100, "threshold": 0.5}),
    "detect": ("detect@1", {}),
    "faces": ("faces@1", {"mode": "box"}),
    "segment": ("segment@1", {}),
    "anomaly": ("anomaly@1", {}),
}


class Project:
    def __init__(self, files: ProjectFiles, graph: FlowGraph, env: NodeEnvironment,
                 capability_graphs: dict[str, FlowGraph] | None = None):
        self.files = files
        self.config = files.config
        self.api_keys = files.api_keys
        self.graph = graph
        self.env = env
        self.runner = FlowRunner(graph)
        # capability -> the runner of the flow that answers it (objects, faces, text...; config/project.py).
        self.capabilities = {name: FlowRunner(g) for name, g in (capability_graphs or {}).items()}
        self._model_flows_lock = threading.Lock()
        self.ready_nodes = 0
        self.flow_sha256 = hashlib.sha256(files.flow_path.read_bytes()).hexdigest()
        assert env.runtime is not None
        self.runtime = env.runtime

    @classmethod
    def load(cls, project_dir: Path, *, code_allowed: bool = True) -> Project:
        """Validate and compile; raises ConfigError with every problem. Nothing heavy runs here."""
        files = load_project_files(project_dir)
        placement = place(files.profile)
        if not placement.runnable:
            files.profile_problem.message = placement.reason
            raise DeviceUnavailable([str(files.profile_problem)])
        if placement.device != files.profile.device:
            log.warning(placement.reason)
        config = files.config
        cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir(files.directory)
        runtime = Runtime(files.directory / config.models_dir,
                          RuntimeOptions.from_profile(files.profile, placement.device or "CPU",
                                                      cache_dir if cache_dir.is_absolute()
                                                      else files.directory / cache_dir))
        env = NodeEnvironment(project_dir=files.directory, config=config, code_allowed=code_allowed,
                              runtime=runtime)
        return cls._compiled(files, env)

    @classmethod
    def _compiled(cls, files: ProjectFiles, env: NodeEnvironment) -> Project:
        graph, problems = compile_flow(files.flow, env)
        capability_graphs = {}
        for capability, flow in files.capability_flows.items():
            capability_graph, capability_problems = compile_flow(flow, env)
            problems += capability_problems
            if capability_graph is not None:
                capability_graphs[capability] = capability_graph
        if graph is None or problems:
            raise ConfigError(sorted_problems(problems))
        return cls(files, graph, env, capability_graphs)

    def reloaded(self) -> tuple[Project, list[str]]:
        """This project as its files say now, compiled and prepared beside this one, which keeps serving (call
        it from a thread of its own: hooks are imported and new models compiled here). The models this project
        has loaded are shared, not compiled again, and so are its Code hook threads.

        Settings the running server fixed when it started (RESTART_SETTINGS, RESTART_LIMITS) keep this
        project's values; returns the new project and the names of those that changed, which need a restart.
        Raises ConfigError with every problem (`file:line` of the flow or the hook) and keeps nothing."""
        files = load_project_files(self.files.directory)
        config = files.config
        changed = [name for name in RESTART_SETTINGS if getattr(config, name) != getattr(self.config, name)]
        if files.api_keys != self.api_keys and not {"api_key", "api_keys"} & set(changed):
            changed.append("api_keys (a key's file)")
        changed += [f"limits.{name}" for name in RESTART_LIMITS
                    if getattr(config.limits, name) != getattr(self.config.limits, name)]
        kept_limits = config.limits.model_copy(update={name: getattr(self.config.limits, name)
                                                       for name in RESTART_LIMITS})
        config = config.model_copy(update={**{name: getattr(self.config, name) for name in RESTART_SETTINGS},
                                           "limits": kept_limits})
        files = dataclasses.replace(files, config=config, api_keys=self.api_keys, profile=self.files.profile)
        runtime = self.runtime.successor()
        env = NodeEnvironment(project_dir=files.directory, config=config, code_allowed=self.env.code_allowed,
                              runtime=runtime, extras=dict(self.env.extras))
        try:
            new = self._compiled(files, env)
            for runner in new.runners:
                runner.observe_node = self.runner.observe_node
            new.prepare(describe_failures=True)
            # Stored models that a vendor API asked for by name run on one-node flows built on first use: the new
            # project has them ready too (on the same loaded slots), so a request in flight finds them.
            for key in list(self.capabilities):
                if key.startswith("model:"):
                    model, _, version = key[len("model:"):].partition("@")
                    try:
                        new.model_capability(model, version or None)
                    except (ConfigError, StoreError) as error:
                        log.warning("reload: %s is no longer served: %s", key, error)
        except BaseException:
            hooks = env.extras.get("hooks")
            if hooks is not None and hooks is not self.env.extras.get("hooks"):
                hooks.shutdown()  # made for the failed flow; the serving one's threads are kept
            raise
        finally:
            runtime.end_inheritance()
        return new, changed

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def api_key(self) -> bytes | None:
        """The key named "default" (`api_key` in project.yaml)."""
        return self.api_keys.get("default")

    @property
    def runners(self) -> list[FlowRunner]:
        """The project's flow, then the capabilities' flows."""
        return [self.runner, *self.capabilities.values()]

    @property
    def nodes(self) -> list[Node]:
        return [node for runner in self.runners for node in runner.graph.nodes.values()]

    @property
    def node_count(self) -> int:
        return len(self.nodes)

    def prepare(self, describe_failures: bool = False) -> None:
        """Load hooks and compile models (in a worker thread); the project is ready when every node is.
        ``describe_failures``: a node that cannot be prepared raises ConfigError naming the node and, for a
        hook, the file and line that failed, instead of the exception itself."""
        for node in self.nodes:
            if describe_failures:
                try:
                    node.prepare()
                except Exception as error:  # noqa: BLE001 - any failure of a hook's import is reported
                    raise ConfigError([self._prepare_problem(node, error)]) from error
            else:
                node.prepare()
            self.ready_nodes += 1

    def _prepare_problem(self, node: Node, error: Exception) -> str:
        """`code/check.py:3: nodes.h: cannot prepare (ModuleNotFoundError: No module named 'nope')`: the deepest
        place in the project's folder that the failure went through, else the flow file."""
        place = _display(self.files.flow_path)
        for frame in reversed(traceback.extract_tb(error.__traceback__)):
            if Path(frame.filename).is_relative_to(self.files.directory):
                place = f"{_display(Path(frame.filename))}:{frame.lineno}"
                break
        if isinstance(error, SyntaxError) and error.filename and error.lineno:
            place = f"{_display(Path(error.filename))}:{error.lineno}"
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return f"{place}: nodes.{node.id}: cannot prepare ({type(error).__name__}: {first})"

    @property
    def ready(self) -> bool:
        return self.ready_nodes == self.node_count

    @property
    def stuck_hooks(self) -> int:
        hooks = self.env.extras.get("hooks")
        return hooks.stuck if hooks is not None else 0

    @property
    def override_ranges(self) -> dict[str, tuple[float, float]]:
        """Query parameters some node lets a request set, each with the range every such node accepts."""
        ranges: dict[str, tuple[float, float]] = {}
        for node in self.graph.nodes.values():
            for name in getattr(node.settings, "overrides", ()):
                low, high = node.override_ranges[name]
                if name in ranges:
                    low, high = max(low, ranges[name][0]), min(high, ranges[name][1])
                ranges[name] = (low, high)
        return ranges

    def capability_problem(self, capability: str) -> str | None:
        """Why ``capability`` cannot be answered (no flow for it in project.yaml, or a node of its flow that is
        unavailable, such as an empty face gallery), or None when it can."""
        runner = self.capabilities.get(capability)
        if runner is None:
            return f"project.yaml names no flow for the capability '{capability}' (capabilities:)"
        for node in runner.graph.nodes.values():
            reason = node.unavailable()
            if reason is not None:
                return reason
        return None

    def model_capability(self, model: str, version: str | None = None) -> str:
        """The capability key of a one-node flow that runs stored model ``model`` with its task's node type and
        default settings: at the version its `current` pointer names (following switches), or at ``version``
        whatever the pointer says. Built and prepared on first use (it compiles: call it from a worker thread).
        Raises ConfigError or StoreError saying what is wrong with the model or version."""
        if version is not None and read_current(self.runtime.store / model) != version:
            key, runtime = f"model:{model}@{version}", self.runtime.pinned(version)
        else:
            key, runtime = f"model:{model}", self.runtime
        with self._model_flows_lock:
            if key in self.capabilities:
                return key
            env = dataclasses.replace(self.env, runtime=runtime)
            spec = read_spec(resolve_version(runtime.store, model, version))
            if spec.task not in TASK_NODES:
                raise ConfigError([f"model '{model}' is a {spec.task} model; models of these tasks run alone: "
                                   f"{', '.join(TASK_NODES)}"])
            node_type, extra = TASK_NODES[spec.task]
            settings = NODE_TYPES[node_type].settings_model.model_validate({"type": node_type, "model": model,
                                                                            **extra})
            name = f"<model {model}{'@' + version if version else ''}>"
            graph, problems = compile_flow(FlowSpec({model: settings}, YamlDocument(name, {"nodes": {model: {}}})),
                                           env)
            if graph is None:
                raise ConfigError(sorted_problems(problems))
            runner = FlowRunner(graph)
            runner.observe_node = self.runner.observe_node
            for node in graph.nodes.values():
                node.prepare()
            self.capabilities[key] = runner
            return key

    def inspect(self, frame: Frame, data: str, request: dict[str, Any] | None = None,
                capability: str | None = None) -> Context:
        """Run the flow (or the flow of ``capability``) on one frame; never raises for a problem inside the flow
        (it is in `errors`). ``request``: the validated overrides and ``lang`` the flow's nodes read."""
        started = time.perf_counter()
        ctx = Context.for_frame(frame.image, data, frame.warnings, request)
        if capability is not None and capability not in self.capabilities and capability.startswith("model:"):
            # Named before a reload by the project this one replaced, built (at once, on loaded slots) here.
            model, _, version = capability[len("model:"):].partition("@")
            capability = self.model_capability(model, version or None)
        runner = self.runner if capability is None else self.capabilities[capability]
        ctx = runner.run(ctx)
        finish(ctx, started)
        return ctx

    def close(self) -> None:
        hooks = self.env.extras.get("hooks")
        if hooks is not None:
            hooks.shutdown()
