"""The dialect registry: one line per vendor API. project.yaml `apis` names them; the app mounts their routes."""

from __future__ import annotations

from appliance.server.dialects.base import Dialect
from appliance.server.dialects.deepomatic import Deepomatic
from appliance.server.dialects.imagerecognize import ImageRecognize
from appliance.server.dialects.kserve import KServe
from appliance.server.dialects.pekat import Pekat
from appliance.server.dialects.raypack import Raypack

DIALECTS: dict[str, type[Dialect]] = {
    dialect.name: dialect
    for dialect in (
        Pekat,
        Deepomatic,
        ImageRecognize,
        Raypack,
        KServe,
    )
}
DIALECT_NAMES = tuple(DIALECTS)


def dialect_class(name: str) -> type[Dialect]:
    return DIALECTS[name]
