"""The node registry: one line per node type. The flow loader, `check` and the docs all read it."""

from __future__ import annotations

from appliance.nodes.anomaly import Anomaly
from appliance.nodes.base import Node, type_tag
from appliance.nodes.classify import Classify
from appliance.nodes.code import Code
from appliance.nodes.color import Color
from appliance.nodes.crop import Crop
from appliance.nodes.demographics import Demographics
from appliance.nodes.detect import Detect
from appliance.nodes.evaluate import Evaluate
from appliance.nodes.faces import Faces
from appliance.nodes.flip import Flip
from appliance.nodes.identify import Identify
from appliance.nodes.mask import Mask
from appliance.nodes.ocr import Ocr
from appliance.nodes.resize import Resize
from appliance.nodes.rotate import Rotate
from appliance.nodes.segment import Segment

NODE_TYPES: dict[str, type[Node]] = {
    type_tag(node.settings_model): node
    for node in (
        Crop,
        Resize,
        Rotate,
        Flip,
        Color,
        Mask,
        Code,
        Evaluate,
        Anomaly,
        Classify,
        Segment,
        Detect,
        Faces,
        Identify,
        Demographics,
        Ocr,
    )
}
