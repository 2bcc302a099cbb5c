"""A running project: its compiled flow and the synchronous inspection of one frame.

`Project.inspect` is the whole data path after decoding (frame -> context -> flow), called from a
worker thread; the server owns everything about HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config.loader import ProjectFiles, load_project_files, sorted_problems
from appliance.context import Context, finish
from appliance.errors import ConfigError, DeviceUnavailable
from appliance.flow.graph import FlowGraph, compile_flow
from appliance.flow.runner import FlowRunner
from appliance.nodes.base import NodeEnvironment
from appliance.runtime.devices import place
from appliance.runtime.models import Runtime, RuntimeOptions, default_cache_dir

if TYPE_CHECKING:
    from appliance.frames import Frame

log = logging.getLogger(__name__)


class Project:
    def __init__(self, files: ProjectFiles, graph: FlowGraph, env: NodeEnvironment):
        self.files = files
        self.config = files.config
        self.api_key = files.api_key
        self.graph = graph
        self.env = env
        self.runner = FlowRunner(graph)
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
        graph, problems = compile_flow(files.flow, env)
        if graph is None:
            raise ConfigError(sorted_problems(problems))
        return cls(files, graph, env)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def node_count(self) -> int:
        return len(self.graph.nodes)

    def prepare(self) -> None:
        """Load hooks and compile models (in a worker thread); the project is ready when every node is."""
        for node in self.graph.nodes.values():
            node.prepare()
            self.ready_nodes += 1

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

    def inspect(self, frame: Frame, data: str, request: dict[str, Any] | None = None) -> Context:
        """Run the flow on one frame; never raises for a problem inside the flow (it is in `errors`).
        ``request``: the validated overrides and ``lang`` of the query (see server/params.py)."""
        started = time.perf_counter()
        ctx = Context.for_frame(frame.image, data, frame.warnings, request)
        ctx = self.runner.run(ctx)
        finish(ctx, started)
        return ctx

    def close(self) -> None:
        hooks = self.env.extras.get("hooks")
        if hooks is not None:
            hooks.shutdown()
