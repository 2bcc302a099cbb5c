"""flows/*.yaml: a directed acyclic graph of nodes keyed by id, each with a versioned type and its settings.

```yaml
nodes:
  roi:   {type: crop@1, x: 100, y: 50, width: 640, height: 480, next: [check]}
  check: {type: evaluate@1, rules: [{rule: no_rectangles}]}
```
Nodes without a predecessor start the flow. Validation uses the node registry, so a new node type
needs no change here.
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
    # Imported here: flow.graph imports the node registry, which imports this package's siblings.
    from appliance.flow.graph import edge_problems

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
