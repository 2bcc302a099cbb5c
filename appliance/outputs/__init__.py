"""The output registry: one line per kind. project.yaml `outputs:` lists them; see docs/outputs.md."""

from __future__ import annotations

from typing import Any

from appliance.outputs.base import Output, OutputSettings
from appliance.outputs.modbus import ModbusOutput
from appliance.outputs.mqtt import MqttOutput
from appliance.outputs.opcua import OpcUaOutput
from appliance.outputs.s7 import S7Output
from appliance.outputs.tcp import TcpOutput
from appliance.outputs.webhook import WebhookOutput

OUTPUT_TYPES: dict[str, type[Output[Any]]] = {
    kind.settings_model.model_fields["type"].annotation.__args__[0]: kind  # type: ignore[union-attr]
    for kind in (
        TcpOutput,
        ModbusOutput,
        S7Output,
        MqttOutput,
        WebhookOutput,
        OpcUaOutput,
    )
}


def output_settings(item: dict[str, Any]) -> OutputSettings:
    """Validate one `outputs:` entry with its kind's model (raises KeyError for an unknown type)."""
    return OUTPUT_TYPES[item.get("type", "")].settings_model.model_validate(item)
