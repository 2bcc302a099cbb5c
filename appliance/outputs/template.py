"""Payload templates of the text outputs (TCP line, HTTP webhook, MQTT): `$result`, `${score}`..., checked at load.

A template is compiled once (`Template`): it knows which placeholders it uses and computes only those for each
message, so `$request_id` costs a string lookup, not the whole message as JSON (measured in bench/outputs.py)."""

from __future__ import annotations

import string
from collections.abc import Callable
from functools import lru_cache

from appliance.outputs.base import Message

FIELDS = tuple(Message.__dataclass_fields__)
# $json: the whole message as JSON; $ok: 1 or 0; $verdict: OK or NG (PEKAT's TCP output sends such words).
EXTRA = ("json", "ok", "verdict")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


# How each placeholder reads a message; a field without an entry is its value as text (str()).
TEXT: dict[str, Callable[[Message], object]] = {
    "result": lambda message: "true" if message.result else "false",
    "ok": lambda message: "1" if message.result else "0",
    "verdict": lambda message: "OK" if message.result else "NG",
    "score": lambda message: _number(message.score),
    "threshold": lambda message: _number(message.threshold),
    "labels": lambda message: ",".join(message.labels),
    "models": lambda message: ",".join(f"{m.get('model')}:{m.get('version')}" for m in message.models),
    "json": lambda message: message.json,
}


def check_template(text: str) -> str:
    """The template if every placeholder is a field of the message; else ValueError naming the unknown ones."""
    template = string.Template(text)
    if not template.is_valid():
        raise ValueError("invalid placeholder: write $name or ${name}, and $$ for a dollar sign")
    unknown = sorted(set(template.get_identifiers()) - set(FIELDS) - set(EXTRA))
    if unknown:
        raise ValueError(f"unknown placeholder ${unknown[0]}; known: {', '.join('$' + f for f in (*FIELDS, *EXTRA))}")
    return text


class Template:
    """A checked template, ready to render: only the placeholders it holds are computed for a message."""

    def __init__(self, text: str):
        self.template = string.Template(check_template(text))
        names = tuple(dict.fromkeys(self.template.get_identifiers()))
        self.readers = tuple((name, TEXT.get(name) or _attribute(name)) for name in names)
        self.constant = None if names else self.template.substitute()

    def render(self, message: Message) -> str:
        if self.constant is not None:
            return self.constant
        return self.template.substitute({name: read(message) for name, read in self.readers})


def _attribute(name: str) -> Callable[[Message], object]:
    return lambda message: getattr(message, name)


@lru_cache(maxsize=64)
def _compiled(text: str) -> Template:
    # Settings are frozen: each template compiles once per process.
    return Template(text)


def render(text: str, message: Message) -> str:
    """The template ``text`` filled in for ``message`` (compiled on its first use)."""
    return _compiled(text).render(message)
