"""The node registry: one line per node type. The flow loader, `check` and the docs all read it.

A line names the type's settings model (settings.py, imported here: validating a flow needs it) and the class
that runs it (imported when a flow is built, with OpenCV and OpenVINO: loading a project's configuration imports
neither). A new node type is its settings model, its module, and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from appliance.nodes.base import Node, NodeSettings, type_tag
from appliance.nodes.settings import (
    AnomalySettings,
    ClassifySettings,
    CodeSettings,
    ColorSettings,
    CropSettings,
    DemographicsSettings,
    DetectSettings,
    EvaluateSettings,
    FacesSettings,
    FlipSettings,
    IdentifySettings,
    MaskSettings,
    OcrSettings,
    ResizeSettings,
    RotateSettings,
    SegmentSettings,
)


@dataclass(frozen=True)
class NodeType:
    """A registered node type: its settings model, and where its implementation is."""

    settings_model: type[NodeSettings]
    implementation_path: str  # "appliance.nodes.crop.Crop"

    @property
    def tag(self) -> str:
        return type_tag(self.settings_model)

    @property
    def implementation(self) -> type[Node]:
        """The node class, imported on first use (Python keeps the module)."""
        module, _, name = self.implementation_path.rpartition(".")
        node_class: type[Node] = getattr(importlib.import_module(module), name)
        return node_class


NODE_TYPES: dict[str, NodeType] = {
    entry.tag: entry
    for entry in (
        NodeType(CropSettings, "appliance.nodes.crop.Crop"),
        NodeType(ResizeSettings, "appliance.nodes.resize.Resize"),
        NodeType(RotateSettings, "appliance.nodes.rotate.Rotate"),
        NodeType(FlipSettings, "appliance.nodes.flip.Flip"),
        NodeType(ColorSettings, "appliance.nodes.color.Color"),
        NodeType(MaskSettings, "appliance.nodes.mask.Mask"),
        NodeType(CodeSettings, "appliance.nodes.code.Code"),
        NodeType(EvaluateSettings, "appliance.nodes.evaluate.Evaluate"),
        NodeType(AnomalySettings, "appliance.nodes.anomaly.Anomaly"),
        NodeType(ClassifySettings, "appliance.nodes.classify.Classify"),
        NodeType(SegmentSettings, "appliance.nodes.segment.Segment"),
        NodeType(DetectSettings, "appliance.nodes.detect.Detect"),
        NodeType(FacesSettings, "appliance.nodes.faces.Faces"),
        NodeType(IdentifySettings, "appliance.nodes.identify.Identify"),
        NodeType(DemographicsSettings, "appliance.nodes.demographics.Demographics"),
        NodeType(OcrSettings, "appliance.nodes.ocr.Ocr"),
    )
}
