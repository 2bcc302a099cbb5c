"""The source registry: one line per kind. project.yaml `sources:` lists them; see docs/sources.md."""

from __future__ import annotations

from typing import Any

from appliance.sources.base import Source
from appliance.sources.folder import FolderSource
from appliance.sources.genicam import GenicamSource
from appliance.sources.video import VideoSource

SOURCE_TYPES: dict[str, type[Source[Any]]] = {
    kind.settings_model.model_fields["type"].annotation.__args__[0]: kind  # type: ignore[union-attr]
    for kind in (
        FolderSource,
        VideoSource,
        GenicamSource,
    )
}
