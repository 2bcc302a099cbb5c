"""Payload templates of the text outputs (TCP line, HTTP webhook): `$result`, `${score}`..., checked at load."""

from __future__ import annotations

import json
import string
from typing import Any

from appliance.outputs.base import Message

FIELDS = tuple(Message.__dataclass_fields__)
# $json: the whole message as JSON; $ok: 1 or 0; $verdict: OK or NG (PEKAT's TCP output sends such words).
EXTRA = ("json", "ok", "verdict")


def check_template(text: str) -> str:
    """The template if every placeholder is a field of the message; else ValueError naming the unknown ones."""
    template = string.Template(text)
    if not template.is_valid():
        raise ValueError("invalid placeholder: write $name or ${name}, and $$ for a dollar sign")
    unknown = sorted(set(template.get_identifiers()) - set(FIELDS) - set(EXTRA))
    if unknown:
        raise ValueError(f"unknown placeholder ${unknown[0]}; known: {', '.join('$' + f for f in (*FIELDS, *EXTRA))}")
    return text


def render(text: str, message: Message) -> str:
    values: dict[str, Any] = message.as_dict()
    values["labels"] = ",".join(message.labels)
    values["models"] = ",".join(f"{m.get('model')}:{m.get('version')}" for m in message.models)
    values["score"] = "" if message.score is None else f"{message.score:.6g}"
    values["threshold"] = "" if message.threshold is None else f"{message.threshold:.6g}"
    values["result"] = "true" if message.result else "false"
    values["ok"] = "1" if message.result else "0"
    values["verdict"] = "OK" if message.result else "NG"
    values["json"] = json.dumps(message.as_dict(), separators=(",", ":"))
    return string.Template(text).substitute(values)
