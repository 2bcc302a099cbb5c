"""flows/*.yaml: a directed acyclic graph of nodes keyed by id, each with a versioned type and its settings.

```yaml
nodes:
  roi:   {type: crop@1, x: 100, y: 50, width: 640, height: 480, next: [check]}
  check: {type: evaluate@1, rules: [{rule: no_rectangles}]}
```
Nodes without a predecessor start the flow. Validation uses the node registry's settings models, so a new
node type needs no change here; every `next` edge and every cycle is checked here too, each problem with its
place. Building the nodes and checking the branches is flow/graph.py's work.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from appliance.config.source import Problem, YamlDocument, validation_problems
from appliance.nodes import NODE_TYPES
from appliance.nodes.base import NodeSettings

_TOP_KEYS = ("nodes", "description")


@dataclass
class FlowSpec:
    """A flow whose every node settings validated; the graph itself is checked by flow.graph."""

    nodes: dict[str, NodeSettings]
    doc: YamlDocument


def validate_flow(doc: YamlDocument) -> tuple[FlowSpec | None, list[Problem]]:
    problems: list[Problem] = []
    data = doc.data
    if not isinstance(data, dict):
        return None, [doc.problem((), "a flow file must be a mapping with a 'nodes' key")]
    for key in data:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(doc.problem((key,), f"unknown key{hint}", at_key=True))
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        problems.append(doc.problem(("nodes",), "'nodes' must be a non-empty mapping of node id -> settings"))
        return None, problems
    edges = {node_id: [t for t in raw.get("next", []) if isinstance(t, str)]
             if isinstance(raw, dict) and isinstance(raw.get("next", []), list) else []
             for node_id, raw in raw_nodes.items()}
    problems += edge_problems(doc, edges)
    nodes: dict[str, NodeSettings] = {}
    known = ", ".join(NODE_TYPES)
    for node_id, raw in raw_nodes.items():
        path: tuple[Any, ...] = ("nodes", node_id)
        if not isinstance(node_id, str) or not node_id.replace("_", "").replace("-", "").isalnum():
            problems.append(doc.problem(path, "node ids are letters, digits, '_' and '-'", at_key=True))
            continue
        if not isinstance(raw, dict):
            problems.append(doc.problem(path, "a node must be a mapping with at least 'type'"))
            continue
        tag = raw.get("type")
        if tag not in NODE_TYPES:
            message = f"unknown node type {tag!r}; known: {known}" if tag else f"missing 'type'; known: {known}"
            problems.append(doc.problem((*path, "type"), message, at_key=tag is None))
            continue
        model = NODE_TYPES[tag].settings_model
        try:
            nodes[node_id] = model.model_validate(raw)
        except ValidationError as error:
            problems.extend(validation_problems(doc, error, model, prefix=path))
    return FlowSpec(nodes, doc), problems


def edge_problems(doc: YamlDocument, edges: dict[str, list[str]]) -> list[Problem]:
    """Dangling, self and repeated edges, from every node's `next` list (even nodes whose settings failed)."""
    problems = []
    ids = list(edges)
    for node_id, targets in edges.items():
        seen: set[str] = set()
        for index, target in enumerate(targets):
            path = ("nodes", node_id, "next", index)
            if target not in edges:
                close = difflib.get_close_matches(str(target), ids, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(doc.problem(path, f"unknown node '{target}'{hint}"))
            elif target == node_id:
                problems.append(doc.problem(path, f"cycle {node_id} -> {node_id}"))
            elif target in seen:
                problems.append(doc.problem(path, f"'{target}' is listed twice"))
            seen.add(target)
    successors = {n: [t for t in targets if t in edges and t != n] for n, targets in edges.items()}
    return problems + _cycle_problems(doc, successors)


def _cycle_problems(doc: YamlDocument, successors: dict[str, list[str]]) -> list[Problem]:
    problems, state = [], dict.fromkeys(successors, 0)  # 0 new, 1 on the current path, 2 done
    reported: set[frozenset[str]] = set()

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for target in successors[node]:
            if state[target] == 1:
                cycle = path[path.index(target):]
                if frozenset(cycle) not in reported and len(cycle) > 1:
                    reported.add(frozenset(cycle))
                    text = " -> ".join([*cycle, target])
                    problems.append(doc.problem(("nodes", cycle[0], "next"), f"cycle {text}"))
            elif state[target] == 0:
                visit(target, path)
        path.pop()
        state[node] = 2

    for node in successors:
        if state[node] == 0:
            visit(node, [])
    return problems
