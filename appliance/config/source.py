"""YAML loading that remembers where every key and value stood, so problems can say `file:line:col path: message`."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

Path_ = tuple[str | int, ...]


def format_path(path: Path_) -> str:
    """`("nodes", "crop", "next", 1)` -> `nodes.crop.next[1]`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


@dataclass
class Problem:
    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass
class YamlDocument:
    """The parsed data of one YAML file plus the positions of its keys and values."""

    file: str
    data: Any
    key_marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    value_marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Set on a part of a larger file (an inline flow in project.yaml): paths are shown from the file's root.
    prefix: Path_ = ()

    def problem(self, path: Path_, message: str, *, at_key: bool = False) -> Problem:
        """A problem located at the key (for unknown keys) or at the value (everything else) of `path`."""
        marks = self.key_marks if at_key else self.value_marks
        probe = path
        while probe not in marks and probe:
            probe = probe[:-1]
        line, column = marks.get(probe, (0, 0))
        return Problem(self.file, line, column, format_path((*self.prefix, *path)), message)

    def part(self, prefix: Path_) -> YamlDocument:
        """The document below `prefix`, keeping the places of its keys in this file."""
        data = self.data
        for key in prefix:
            data = data[key]

        def below(marks: dict[Path_, tuple[int, int]]) -> dict[Path_, tuple[int, int]]:
            return {path[len(prefix):]: mark for path, mark in marks.items() if path[:len(prefix)] == prefix}

        return YamlDocument(self.file, data, below(self.key_marks), below(self.value_marks), [],
                            (*self.prefix, *prefix))


def _walk(node: yaml.Node, path: Path_, doc: YamlDocument, loader: yaml.SafeLoader) -> Any:
    doc.value_marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            child = (*path, key)
            if key in result:
                doc.problems.append(
                    Problem(doc.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                            format_path(child), "duplicate key (YAML would silently keep only the last one)"))
            doc.key_marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = _walk(value_node, child, doc, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*path, index), doc, loader) for index, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_yaml(path: Path, display_name: str | None = None) -> YamlDocument:
    """Parse one YAML file; a syntax error becomes a located problem instead of an exception."""
    name = display_name or str(path)
    doc = YamlDocument(file=name, data=None)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        doc.problems.append(Problem(name, 0, 0, "", f"cannot read file: {error.strerror}"))
        return doc
    return parse_yaml(text, name)


def parse_yaml(text: str, name: str) -> YamlDocument:
    doc = YamlDocument(file=name, data=None)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        doc.data = {} if root is None else _walk(root, (), doc, loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        reason = getattr(error, "problem", None) or str(error)
        doc.problems.append(Problem(name, line, column, "", f"invalid YAML: {reason}"))
    finally:
        loader.dispose()
    return doc


def _candidates(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: X | Y, Optional[X], Annotated[X, ...] -> [X, Y]."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _candidates(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in _candidates(arg)]
    return [annotation]


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _tag_of(model: type[BaseModel]) -> set[Any]:
    """Values of the model's Literal fields: pydantic puts the chosen one in the error location of a union."""
    tags: set[Any] = set()
    for info in model.model_fields.values():
        if typing.get_origin(info.annotation) is typing.Literal:
            tags.update(typing.get_args(info.annotation))
    return tags


def _model_at(model: Any, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc`, for 'did you mean' suggestions."""
    options: list[Any] = [model]
    for part in loc:
        next_options: list[Any] = []
        for option in options:
            for candidate in _candidates(option):
                if _is_model(candidate):
                    info = candidate.model_fields.get(part) if isinstance(part, str) else None
                    if info is not None:
                        next_options.append(info.annotation)
                    elif part in _tag_of(candidate):
                        next_options.append(candidate)
                elif typing.get_origin(candidate) in (list, tuple) and isinstance(part, int):
                    next_options.append(typing.get_args(candidate)[0])
                elif typing.get_origin(candidate) is dict:
                    next_options.append(typing.get_args(candidate)[1])
        options = next_options
    models = [c for option in options for c in _candidates(option) if _is_model(c)]
    return models[0] if len(models) == 1 else None


def _data_path(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The location as it stands in the YAML: without the union tags pydantic inserts."""
    path: list[Any] = []
    current = data
    for index, part in enumerate(loc):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            current = current[part]
        elif index < len(loc) - 1:
            continue
        path.append(part)
    return tuple(path)


def doc_data_at(doc: YamlDocument, prefix: Path_) -> Any:
    data = doc.data
    for key in prefix:
        if isinstance(data, dict):
            data = data.get(key)
        elif isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data):
            data = data[key]
        else:
            return None
    return data


def validation_problems(doc: YamlDocument, error: ValidationError, model: Any,
                        prefix: Path_ = ()) -> list[Problem]:
    """Turn pydantic's errors into located problems, with 'did you mean' for misspelt keys. ``model`` is the
    model validated, or an annotated union of models (a discriminated one, as a model spec's task classes)."""
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        path = (*prefix, *_data_path(doc_data_at(doc, prefix), loc))
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            message = "unknown key"
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1)
                if close:
                    message += f" (did you mean '{close[0]}'?)"
            problems.append(doc.problem(path, message, at_key=True))
        elif item["type"] == "missing":
            problems.append(doc.problem(path, "required key is missing", at_key=True))
        else:
            message = item["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, "):]
            problems.append(doc.problem(path, message))
    return problems
