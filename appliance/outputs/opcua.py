"""opcua: each inspection's fields written to OPC UA variables (a PLC's or an MES's server), with `asyncua`.

All the configured nodes are written in ONE write request, in the order they are listed (put the counter last: a
PLC that latches on the counter then reads the other values of the same part). Each value is converted to the
node's own data type, read once when connecting; the request's WriteValue items (node id, attribute) are built
then too, so a message only sets each item's value (asyncua's encoding of the request is most of what a write
costs the appliance: bench/outputs.py).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.outputs.base import EnvValue, LoginSettings, Message, Output, OutputSettings, resolved

# What a node may carry: the message's fields, and `ng` (true for an NG part), for a reject gate's bit.
FIELDS = ("result", "ng", "request_id", "timestamp", "project", "score", "threshold", "rectangles", "labels", "text",
          "data", "models", "source", "counter")
POLICIES = ("Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss", "Basic256", "Basic128Rsa15")
INTEGER_RANGES = {"SByte": (-2**7, 2**7), "Byte": (0, 2**8), "Int16": (-2**15, 2**15), "UInt16": (0, 2**16),
                  "Int32": (-2**31, 2**31), "UInt32": (0, 2**32), "Int64": (-2**63, 2**63), "UInt64": (0, 2**64)}
# asyncua logs every request at DEBUG (a user token included): the appliance's DEBUG level must not carry them.
logging.getLogger("asyncua").setLevel(logging.WARNING)
SUPPORTED = ("Boolean", "Double", "Float", "String", "DateTime", *INTEGER_RANGES)


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "opc.tcp" or not parts.hostname:
        raise ValueError(f"{url!r} is not an OPC UA address; e.g. opc.tcp://192.168.0.10:4840/path")
    try:
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as error:
        raise ValueError(f"{url!r}: {error}") from None
    return url


class OpcUaSecurity(BaseModel):
    """`security: {policy: Basic256Sha256, mode: SignAndEncrypt, certificate: ..., private_key: ...}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss", "Basic256", "Basic128Rsa15"]
    mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: str = Field(description="the appliance's certificate (.der or .pem), an absolute path")
    private_key: str = Field(description="its private key (.pem or .der), an absolute path")
    private_key_password: EnvValue | None = Field(None, description="{env: NAME} when the key is encrypted")
    server_certificate: str | None = Field(None, description="the server's certificate, to pin it; absolute path")
    application_uri: str | None = Field(None, description="the URI in the appliance's certificate (default: "
                                        "asyncua's urn:freeopcua:client)")

    @field_validator("certificate", "private_key", "server_certificate")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None:
            path = Path(value)
            if not path.is_absolute():
                raise ValueError(f"{value!r} must be an absolute path")
            if not path.is_file():
                raise ValueError(f"{value} does not exist")
        return value


class OpcUaSettings(OutputSettings, LoginSettings):
    type: Literal["opcua"]
    url: str | EnvValue = Field(description="the server, opc.tcp://host:port/path")
    nodes: dict[str, str] = Field(min_length=1, description="message field -> node id, e.g. "
                                  "{result: 'ns=2;s=Line1.Result', counter: 'ns=2;s=Line1.Count'}; written in this "
                                  "order in one request")
    security: OpcUaSecurity | None = Field(None, description="default: no security (policy None)")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | EnvValue) -> str | EnvValue:
        if isinstance(value, str):
            return check_url(value)
        try:
            check_url(value.resolve())
        except ValueError as error:
            if "environment variable" not in str(error):  # an unset one is reported by the loader, with its place
                raise
        return value

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, value: dict[str, str]) -> dict[str, str]:
        from asyncua import ua

        for field, node in value.items():
            if field not in FIELDS:
                raise ValueError(f"unknown message field {field!r}; known: {', '.join(FIELDS)}")
            try:
                ua.NodeId.from_string(node)
            except Exception as error:  # noqa: BLE001 - asyncua raises several kinds for a bad node id
                raise ValueError(f"{field}: {node!r} is not a node id (e.g. ns=2;s=Line1.Result or ns=2;i=1001): "
                                 f"{error}") from None
        return value


def field_value(message: Message, field: str) -> Any:
    if field == "ng":
        return not message.result
    if field == "labels":
        return ",".join(message.labels)
    if field == "models":
        return json.dumps([dict(model) for model in message.models], separators=(",", ":"))
    return getattr(message, field)


def convert(value: Any, type_name: str) -> Any:
    """The message's value as the node's data type; None: leave the node as it is (e.g. no score to write)."""
    if type_name == "Boolean":
        return bool(value)
    if type_name in ("Double", "Float"):
        return math.nan if value is None else float(value)
    if type_name == "String":
        return "" if value is None else ("true" if value is True else "false" if value is False else str(value))
    if type_name == "DateTime":
        return None if value is None else datetime.fromtimestamp(float(value), UTC)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    low, high = INTEGER_RANGES[type_name]
    number = int(value)
    if low == 0:
        return number % high  # a counter wraps, as PLCs expect
    return (number - low) % (high - low) + low


class OpcUaOutput(Output[OpcUaSettings]):
    settings_model = OpcUaSettings
    client: Any = None
    # (field, variant type, its WriteValue item) in the configured order, made when connecting.
    targets: list[tuple[str, Any, Any]] = []

    async def connect(self) -> None:
        from asyncua import Client, ua
        from asyncua.crypto import security_policies

        settings = self.settings
        client = Client(resolved(settings.url), timeout=settings.timeout_s)
        username, password = settings.login()
        if username is not None:
            client.set_user(username)
        if password is not None:
            client.set_password(password)
        if settings.security is not None:
            security = settings.security
            if security.application_uri:
                client.application_uri = security.application_uri
            await client.set_security(
                getattr(security_policies, f"SecurityPolicy{security.policy}"), security.certificate,
                security.private_key,
                private_key_password=security.private_key_password.resolve() if security.private_key_password
                else None,
                server_certificate=security.server_certificate, mode=getattr(ua.MessageSecurityMode, security.mode))
        self.client = client
        await client.connect()
        targets = []
        for field, node_id in settings.nodes.items():
            node = client.get_node(node_id)
            variant = await node.read_data_type_as_variant_type()
            if variant.name not in SUPPORTED:
                raise ValueError(f"{node_id} ({field}) is a {variant.name}; supported: {', '.join(SUPPORTED)}")
            targets.append((field, variant, ua.WriteValue(NodeId=node.nodeid, AttributeId=ua.AttributeIds.Value)))
        self.targets = targets

    async def send(self, message: Message) -> None:
        from asyncua import ua

        items = []
        for field, variant, item in self.targets:
            value = convert(field_value(message, field), variant.name)
            if value is not None:
                # No source timestamp: many PLC servers (and asyncua's) refuse writing one (BadWriteNotSupported).
                item.Value = ua.DataValue(ua.Variant(value, variant))
                items.append(item)
        if items:
            # One Write service call with every node (the request is encoded before the call awaits anything,
            # so the items may take the next message's values at once).
            for result in await self.client.uaclient.write(ua.WriteParameters(NodesToWrite=items)):
                result.check()

    async def close(self) -> None:
        import asyncio

        client, self.client = self.client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.disconnect(), min(2.0, self.settings.timeout_s))
            except Exception:  # noqa: BLE001 - a dead server cannot be told goodbye (TimeoutError included)
                pass
