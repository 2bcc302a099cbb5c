"""Compile a validated flow into an executable graph: each node's own checks and the branch structure, all
errors at once (its edges and cycles were checked with the flow file, config/flow.py).

Branches follow PEKAT (PROTOCOL.md 7): a node with several successors forks; the branches run on copies
of the context and are merged where they all meet again (the fork's nearest common successor), or at the
end of the flow. A node where only some branches of a fork meet has no defined merge and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.config.flow import FlowSpec
from appliance.config.source import Problem
from appliance.nodes import NODE_TYPES
from appliance.nodes.base import Node, NodeEnvironment

ROOT = "<start>"


@dataclass
class FlowGraph:
    nodes: dict[str, Node]
    successors: dict[str, list[str]]
    # For each fork (and ROOT when there are several first nodes): where its branches merge; None = at the end.
    merge_at: dict[str, str | None] = field(default_factory=dict)
    roots: list[str] = field(default_factory=list)


def _merge_points(successors: dict[str, list[str]], roots: list[str]) -> dict[str, str | None]:
    """Immediate post-dominator of every fork: the first node that every path from the fork reaches."""
    order: list[str] = []
    seen: set[str] = set()

    def post(node: str) -> None:
        seen.add(node)
        for target in successors[node]:
            if target not in seen:
                post(target)
        order.append(node)

    for root in roots:
        if root not in seen:
            post(root)
    # Post-dominator sets, computed sinks first (`order` is a reverse topological order).
    postdom: dict[str, list[str]] = {}
    for node in order:
        targets = successors[node]
        if not targets:
            postdom[node] = [node]
            continue
        common = set(postdom[targets[0]])
        for target in targets[1:]:
            common &= set(postdom[target])
        # Keep the chain ordered nearest-first, which is the order of the first successor's chain.
        postdom[node] = [node] + [n for n in postdom[targets[0]] if n in common]
    merge_at: dict[str, str | None] = {}
    for node, targets in successors.items():
        if len(targets) > 1:
            merge_at[node] = postdom[node][1] if len(postdom[node]) > 1 else None
    if len(roots) > 1:
        common = set(postdom[roots[0]])
        for root in roots[1:]:
            common &= set(postdom[root])
        merge_at[ROOT] = next((n for n in postdom[roots[0]] if n in common), None)
    return merge_at


def _structure_problems(spec: FlowSpec, graph: FlowGraph) -> list[Problem]:
    """Walk the flow as the runner will, without running nodes: each node must be reached exactly once."""
    visits = dict.fromkeys(graph.successors, 0)

    def walk(node: str | None, stop: str | None) -> None:
        while node is not None and node != stop:
            visits[node] += 1
            if visits[node] > 1:
                return
            targets = graph.successors[node]
            if len(targets) > 1:
                merge = graph.merge_at[node]
                for target in targets:
                    walk(target, merge)
                node = merge
            else:
                node = targets[0] if targets else None

    if len(graph.roots) > 1:
        for root in graph.roots:
            walk(root, graph.merge_at[ROOT])
        walk(graph.merge_at[ROOT], None)
    else:
        walk(graph.roots[0], None)
    return [
        spec.doc.problem(("nodes", node), "joins branches that do not all meet here; join every branch of the "
                         "fork at this node, or let the branches end separately", at_key=True)
        for node, count in visits.items() if count > 1
    ]


def compile_flow(spec: FlowSpec, env: NodeEnvironment) -> tuple[FlowGraph | None, list[Problem]]:
    """Check every node's own needs and the branch structure of a flow whose edges validated; build the nodes."""
    problems = []
    for node_id, settings in spec.nodes.items():
        node_type = NODE_TYPES[settings.type].implementation
        for path, message in node_type.check(settings, env):
            problems.append(spec.doc.problem(("nodes", node_id, *path), message))
    if problems:
        return None, problems
    successors = {node_id: list(s.next) for node_id, s in spec.nodes.items()}
    has_predecessor = {t for targets in successors.values() for t in targets}
    roots = [n for n in spec.nodes if n not in has_predecessor]
    nodes = {node_id: NODE_TYPES[s.type].implementation(node_id, s, env) for node_id, s in spec.nodes.items()}
    graph = FlowGraph(nodes, successors, _merge_points(successors, roots), roots)
    problems += _structure_problems(spec, graph)
    return (None if problems else graph), problems
