"""Run a compiled flow on one context, with PEKAT's branch semantics (PROTOCOL.md 7).

Each branch works on its own copy of the context. Where branches merge: `result` is the AND of the
branches that set it; rectangles, heat maps, errors, evaluations and printed output are concatenated in
branch order; the image returns to its value before the fork; other keys the branches added are dropped
unless exactly one branch is still running. `exit` ends a branch; on the main path it ends the flow.
A node that fails ends its branch with `result` false: an unchecked part is NG.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

from appliance.context import Context
from appliance.flow.graph import ROOT, FlowGraph
from appliance.nodes.base import NodeError
from appliance.nodes.code import HookFailed

log = logging.getLogger(__name__)

_CONCATENATED = ("detectedRectangles", "heatmaps", "errors", "evaluation", "warnings", "models", "timings")
_TEXTS = ("stdout", "stderr")
# Keys that every context has: merged by rule above, never dropped as "custom".
_STANDARD = frozenset({
    "result", "processing", "error", "errors", "imageShape", "processingTime", "completeTime", "save", "data",
    "production_mode", "operatorInput", "globalData", "stdout", "stderr", "surfaceClasses", "angle", "lines",
    "detectedRectangles", "image", "heatmaps", "exit", "items", "evaluation", "warnings", "score", "threshold",
    "models", "timings",
})


def _branch_copy(ctx: Context) -> Context:
    branch = Context({k: v for k, v in ctx.items() if k not in ("image", "heatmaps")})
    branch = copy.deepcopy(branch)
    # Nodes replace the image rather than write into it; a Code hook gets its own copy (nodes/code.py).
    branch["image"] = ctx["image"]
    branch["heatmaps"] = list(ctx.get("heatmaps", []))
    branch.to_frame = ctx.to_frame.copy()
    return branch


def _merge(base: Context, branches: list[Context]) -> Context:
    merged = Context({k: v for k, v in base.items()})
    merged.to_frame = base.to_frame
    results = [b["result"] for b in branches if b.get("result") is not None]
    merged["result"] = all(results) if results else base.get("result")
    merged["error"] = any(b.get("error") for b in branches) or bool(base.get("error"))
    for key in _CONCATENATED:
        before = base.get(key) or []
        combined = list(before)
        for branch in branches:
            combined.extend((branch.get(key) or [])[len(before):])
        if combined or key in base:
            merged[key] = combined
    for key in _TEXTS:
        before = base.get(key, "")
        merged[key] = before + "".join(str(b.get(key, ""))[len(before):] for b in branches)
    for key in ("score", "threshold"):
        for branch in branches:
            if key in branch and branch[key] != base.get(key):
                merged[key] = branch[key]
    running = [b for b in branches if not b.get("exit")]
    if len(running) == 1:
        for key, value in running[0].items():
            if key not in _STANDARD:
                merged[key] = value
    merged["exit"] = not running
    return merged


class FlowRunner:
    def __init__(self, graph: FlowGraph):
        self.graph = graph
        # Called with (node id, node type, seconds) after every node; the server's metrics set it.
        self.observe_node: Callable[[str, str, float], None] | None = None
        # Every node takes a gray frame as it is: a Mono8 camera's frames need no BGR conversion (acquisition.py).
        self.takes_gray = all(node.takes_gray for node in graph.nodes.values())

    def run(self, ctx: Context) -> Context:
        graph = self.graph
        if len(graph.roots) > 1:
            ctx = self._fork(ctx, graph.roots, graph.merge_at[ROOT])
            if not ctx.get("exit") and graph.merge_at[ROOT] is not None:
                ctx = self._run_from(graph.merge_at[ROOT], ctx, None)
        else:
            ctx = self._run_from(graph.roots[0], ctx, None)
        ctx.pop("exit", None)
        return ctx

    def _fork(self, ctx: Context, targets: list[str], merge_at: str | None) -> Context:
        return _merge(ctx, [self._run_from(t, _branch_copy(ctx), merge_at) for t in targets])

    def _run_from(self, node_id: str | None, ctx: Context, stop: str | None) -> Context:
        while node_id is not None and node_id != stop:
            node = self.graph.nodes[node_id]
            started = time.perf_counter()
            try:
                node.run(ctx)
            except HookFailed as failure:
                self._fail(ctx, failure.entry)
            except NodeError as error:
                self._fail(ctx, {"node": node_id, "type": "NodeError", "message": str(error)})
            except Exception as error:  # noqa: BLE001 - a broken node answers with an error entry, not a 500
                log.exception("node %s failed", node_id)
                self._fail(ctx, {"node": node_id, "type": type(error).__name__, "message": str(error)[:200]})
            seconds = time.perf_counter() - started
            ctx.setdefault("timings", []).append((node_id, seconds))
            if self.observe_node is not None:
                self.observe_node(node_id, node.settings.type, seconds)
            if ctx.get("exit"):
                return ctx
            targets = self.graph.successors[node_id]
            if len(targets) > 1:
                merge_at = self.graph.merge_at[node_id]
                ctx = self._fork(ctx, targets, merge_at)
                if ctx.get("exit"):
                    return ctx
                node_id = merge_at
            else:
                node_id = targets[0] if targets else None
        return ctx

    @staticmethod
    def _fail(ctx: Context, entry: dict) -> None:
        ctx["errors"].append(entry)
        ctx["error"] = True
        ctx["result"] = False
        ctx["exit"] = True
