"""docs/nodes.md's settings tables, generated from the node settings models (settings.py) and their descriptions.

    python -m appliance.nodes.docs [docs/nodes.md]            rewrite the tables in place
    python -m appliance.nodes.docs --check [docs/nodes.md]    exit 1 when the file is not what it would become

The prose of docs/nodes.md is written by hand; each node type's part between `<!-- settings: TYPE -->` and
`<!-- end settings -->` is generated here: the settings model's docstring, then one row per setting (type,
default, description), then a table per kind of entry of a list setting (evaluate@1's rules). `common` and
`model` name the settings every node and every model node take. tests/nodes/test_docs.py checks that the file is
current and that every registered node type has its part.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from appliance.nodes import NODE_TYPES
from appliance.nodes.base import ModelNodeSettings, NodeSettings, OverridableSettings

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "nodes.md"
_BLOCK = re.compile(r"(<!-- settings: (?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- end settings -->)", re.S)
COMMON, MODEL, OVERRIDES = "common", "model", "overrides"


def _literal_values(annotation: Any) -> tuple[Any, ...] | None:
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


_PATTERNS = {r"^#[0-9a-fA-F]{6}$": "colour `#rrggbb`", r"^[A-Za-z_][A-Za-z0-9_]*$": "Python name"}


def _constraints(metadata: list[Any]) -> tuple[str, str, str | None]:
    """(prefix, bounds, what a pattern stands for) of a type's constraints: ("non-empty ", "≥ 0, ≤ 1", None)."""
    lower, upper, prefix, pattern = [], [], "", None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            lower.append(f"≥ {_value(item.ge)}")
        elif isinstance(item, annotated_types.Gt):
            lower.append(f"> {_value(item.gt)}")
        elif isinstance(item, annotated_types.Le):
            upper.append(f"≤ {_value(item.le)}")
        elif isinstance(item, annotated_types.Lt):
            upper.append(f"< {_value(item.lt)}")
        elif isinstance(item, annotated_types.MinLen) and item.min_length:
            prefix = "non-empty " if item.min_length == 1 else f"at least {item.min_length}-long "
        elif getattr(item, "pattern", None):
            pattern = _PATTERNS.get(item.pattern, f"text matching `{item.pattern}`")
    return prefix, ", ".join(lower + upper), pattern


def type_text(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A reader's name for a settings type: `number ≥ 0`, `` `pixel`, `fill` ``, `list of text`."""
    prefix, bounds, pattern = _constraints(metadata or [])
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *more = typing.get_args(annotation)
        return type_text(inner, [*(metadata or []), *more])
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if all(inspect.isclass(option) and issubclass(option, BaseModel) for option in options):
            text = "mapping (below)"
        else:
            text = " or ".join(type_text(option) for option in options)
    elif (values := _literal_values(annotation)) is not None:
        text = ", ".join(f"`{_value(value)}`" for value in values)
    elif origin is list:
        text = f"list of {type_text(typing.get_args(annotation)[0])}"
    elif origin is dict:
        text = f"mapping of text to {type_text(typing.get_args(annotation)[1])}"
    elif origin is tuple:
        items = typing.get_args(annotation)
        text = f"{len(items)} {type_text(items[0])}s" if len(set(items)) == 1 else "list"
    elif inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        text = "mapping (below)"
    else:
        text = {int: "integer", float: "number", str: "text", bool: "true or false"}.get(annotation, "any")
    if pattern is not None:
        text = text.replace("text", pattern, 1) if "text" in text else pattern
    return prefix + text + (f" {bounds}" if bounds else "")


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return f"`{_value(info.default_factory())}`"  # type: ignore[call-arg]
    if info.default is PydanticUndefined:
        return "required"
    return f"`{_value(info.default)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _docstring(model: type[BaseModel]) -> str:
    return " ".join((inspect.getdoc(model) or "").split())


def own_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The settings a node type adds to those every node (or every model node) takes: a field it redefines
    (identify@1's `model`, with a default) is its own."""
    shared = NodeSettings.model_fields | (ModelNodeSettings.model_fields if issubclass(model, ModelNodeSettings)
                                          else {})
    return {name: info for name, info in model.model_fields.items()
            if name != "type" and (name not in shared or repr(info) != repr(shared[name]))}


def _nested_models(info: FieldInfo) -> list[type[BaseModel]]:
    """The models of a list or mapping setting's entries (evaluate@1's rules, mask@1's rectangles)."""
    found: list[type[BaseModel]] = []

    def walk(annotation: Any) -> None:
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            found.append(annotation)
            return
        for arg in typing.get_args(annotation):
            walk(arg)

    walk(info.annotation)
    return found


def settings_table(fields: dict[str, FieldInfo]) -> list[str]:
    lines = ["| setting | type | default | |", "|---|---|---|---|"]
    for name, info in fields.items():
        lines.append(f"| `{name}` | {_cell(type_text(info.annotation, info.metadata))} | {default_text(info)} | "
                     f"{_cell(info.description or '')} |")
    return lines


def entries_table(name: str, models: list[type[BaseModel]]) -> list[str]:
    """One row per kind of entry: its tag (a Literal field such as `rule`) or name, its settings, what it does."""
    lines = [f"`{name}` entries:", "", "| entry | settings | |", "|---|---|---|"]
    for model in models:
        tag = next(((field, values[0]) for field, info in model.model_fields.items()
                    if (values := _literal_values(info.annotation)) is not None and len(values) == 1), None)
        settings = [f"`{field}`" + ("" if default_text(info) == "required" else f" ({default_text(info)})")
                    for field, info in model.model_fields.items() if tag is None or field != tag[0]]
        entry = f"`{tag[0]}: {tag[1]}`" if tag else model.__name__
        lines.append(f"| {entry} | {_cell(', '.join(settings))} | {_cell(_docstring(model))} |")
    return lines


def overrides_table() -> list[str]:
    """Per node type, what a request may set and in what range: read from the one declaration (each settings
    model's `override_ranges`, nodes/base.py)."""
    lines = ["| node type | a request may set (where `overrides` lists it) |", "|---|---|"]
    for tag, node_type in NODE_TYPES.items():
        model = node_type.settings_model
        if issubclass(model, OverridableSettings):
            taken = ", ".join(f"`{name}` {low:g} to {high:g}" for name, (low, high) in model.override_ranges.items())
            lines.append(f"| {tag} | {taken or 'nothing'} |")
    return lines


def block(name: str) -> str:
    """The generated part for a node type (or `common`, `model`, `overrides`)."""
    if name == OVERRIDES:
        return "\n".join(overrides_table()) + "\n"
    if name == COMMON:
        return "\n".join(settings_table({k: v for k, v in NodeSettings.model_fields.items()})) + "\n"
    if name == MODEL:
        shared = {k: v for k, v in ModelNodeSettings.model_fields.items() if k not in NodeSettings.model_fields}
        return "\n".join(settings_table(shared)) + "\n"
    model = NODE_TYPES[name].settings_model
    fields = own_fields(model)
    lines = [_docstring(model), ""] if _docstring(model) else []
    lines += settings_table(fields) if fields else ["No settings of its own."]
    for field, info in fields.items():
        nested = _nested_models(info)
        if nested:
            lines += ["", *entries_table(field, nested)]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` with every generated part rewritten; raises ValueError for a missing or unknown part."""
    names = [match.group("name") for match in _BLOCK.finditer(text)]
    wanted = [COMMON, MODEL, OVERRIDES, *NODE_TYPES]
    missing = [name for name in wanted if name not in names]
    unknown = [name for name in names if name not in wanted]
    if missing or unknown or len(names) != len(set(names)):
        problems = [f"no part for {', '.join(missing)}: add `<!-- settings: TYPE -->` then `<!-- end settings -->` "
                    "where its section is"] if missing else []
        problems += [f"parts for types that are not registered: {', '.join(unknown)}"] if unknown else []
        problems += ["a part appears twice"] if len(names) != len(set(names)) else []
        raise ValueError("; ".join(problems))
    return _BLOCK.sub(lambda match: match.group(1) + block(match.group("name")) + match.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.nodes.docs", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is not current; change nothing")
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    try:
        current = render(text)
    except ValueError as error:
        print(f"{args.path}: {error}", file=sys.stderr)
        return 1
    if args.check:
        if current != text:
            print(f"{args.path} is not current: run python -m appliance.nodes.docs", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.path.write_text(current, encoding="utf-8")
        print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
