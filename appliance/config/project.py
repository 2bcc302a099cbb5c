"""project.yaml: one project = one process on one port, with its flow, key, limits and Code settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from appliance.config.apis import API_NAMES


class StrictModel(BaseModel):
    """Every configuration model forbids unknown keys: a typo is an error with its place, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyFromEnv(StrictModel):
    env: str = Field(min_length=1)


class KeyFromFile(StrictModel):
    file: str = Field(min_length=1)


class Limits(StrictModel):
    """Request limits (RELIABILITY.md, rules that apply everywhere)."""

    max_frame_pixels: PositiveInt = 33_554_432
    # None means 3 x max_frame_pixels + 1 MiB: a full BGR frame at the pixel limit plus headers of any image format.
    max_body_bytes: PositiveInt | None = None
    max_data_bytes: PositiveInt = 16_384
    body_read_timeout_s: PositiveFloat = 10.0
    # None means 2 x the inference slots (OPTIMAL_NUMBER_OF_INFER_REQUESTS) of the flow's models, or 2 x the
    # worker threads when the flow has no model.
    queue_depth: PositiveInt | None = None
    queue_timeout_s: PositiveFloat = 5.0
    hook_timeout_s: PositiveFloat = 2.0
    max_stuck_hooks: PositiveInt = 2
    drain_timeout_s: PositiveFloat = 20.0

    @property
    def body_bytes(self) -> int:
        return self.max_body_bytes or 3 * self.max_frame_pixels + (1 << 20)


class CodeSettings(StrictModel):
    folder: str = "code"
    enabled: bool = True


class ImageResponse(StrictModel):
    """How `image`, `annotated_image` and `heatmap` answers are encoded when the client does not say."""

    format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int = Field(default=90, ge=1, le=100)


class MetricsSettings(StrictModel):
    """GET /metrics needs no API key (Prometheus scrapes it); it can be switched off or kept to this machine."""

    enabled: bool = True
    loopback_only: bool = False  # 403 for scrapers that are not on this machine


class ConsoleGallery(StrictModel):
    """Frames the console keeps: every NG frame, OK frames by sampling, and any frame a Code hook marks with
    `context["save"] = True` (PEKAT's key); past either bound the oldest go first."""

    enabled: bool = True
    max_frames: PositiveInt = 500
    max_megabytes: PositiveInt = 1024
    ok_every_s: float = Field(default=60.0, ge=0)  # one OK frame per this many seconds; 0 keeps none
    max_per_second: PositiveInt = 5  # frames written a second at most: the rest of a burst is counted, not kept
    format: Literal["png", "jpeg"] = "png"  # png: lossless, to retrain from


class ConsoleSettings(StrictModel):
    """The operator console at /console/ (appliance/console/, docs/console.md); off unless enabled."""

    enabled: bool = False
    # Browsers on other machines, with the project's key; otherwise this machine only.
    remote: bool = False
    live_fps: float = Field(default=5.0, gt=0, le=30)  # frames pushed to each page at most, the latest wins
    session_hours: PositiveFloat = 12.0
    folder: str = "console"  # the gallery and the teaching jobs, relative to the project folder
    gallery: ConsoleGallery = ConsoleGallery()


KeySource = str | KeyFromEnv | KeyFromFile
# A flow: the path of a flow file relative to the project folder, or the flow itself (a 'nodes' mapping).
FlowReference = str | dict[str, Any]


class Capabilities(StrictModel):
    """What the vision APIs sell, each answered by a flow of the project's. A dialect asks for a capability by its
    name; a project that names no flow for it answers that API's "not installed" error."""

    objects: FlowReference | None = None
    food: FlowReference | None = None
    faces: FlowReference | None = None
    text: FlowReference | None = None
    nsfw: FlowReference | None = None
    demographics: FlowReference | None = None
    identities: FlowReference | None = None

    def named(self) -> dict[str, FlowReference]:
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}


class ProjectConfig(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    flow: str | dict[str, Any] = Field(
        description="path of the flow file, relative to the project folder, or the flow itself (a 'nodes' mapping)")
    api_key: KeySource | None = None
    # Several keys, each with a name (logs and per-key quotas use the name, never the key): a literal, env or file.
    api_keys: dict[str, KeySource] = Field(default_factory=dict)
    # The vendor APIs this project serves on its port (appliance/server/dialects/); their paths do not collide.
    apis: list[str] = Field(default_factory=lambda: ["pekat"], min_length=1)
    # Per-API settings, each validated by that API's own settings model (e.g. imagerecognize: {daily_quota: 3000}).
    api_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    capabilities: Capabilities = Capabilities()
    # Where each inspection's result goes besides the HTTP answer (PLC, MQTT, MES...), each checked by its kind's
    # own settings model (appliance/outputs/, docs/outputs.md).
    outputs: list[dict[str, Any]] = Field(default_factory=list)
    # Frames the appliance acquires itself (cameras, streams, a watched folder; appliance/sources/,
    # docs/sources.md), inspected as HTTP frames are and sent to the outputs.
    sources: list[dict[str, Any]] = Field(default_factory=list)
    firmware_profile: str = "cpu"
    models_dir: str = Field("models", description="the project's model store, relative to the project folder")
    # OpenVINO's compiled-model cache; default: systemd's CacheDirectory, else $XDG_CACHE_HOME/appliance, else
    # <project>/.cache/openvino (appliance/paths.py, docs/install.md).
    cache_dir: str | None = None
    color: Literal["bgr", "gray"] = "bgr"
    limits: Limits = Limits()
    code: CodeSettings = CodeSettings()
    image_response: ImageResponse = ImageResponse()
    metrics: MetricsSettings = MetricsSettings()
    console: ConsoleSettings = ConsoleSettings()
    # PEKAT clients use shared memory only when /version >= 3.18.0 (PROTOCOL.md 6); containers without
    # --ipc=host must answer lower so the client falls back to raw bodies. Default: 3.18.0+appliance.<ours>.
    version_reply: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)*(\+[A-Za-z0-9.]+)?$")

    @field_validator("flow")
    @classmethod
    def _flow_named(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("flow is empty; give the path of a flow file or the flow itself")
        return value

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: object) -> object:
        if isinstance(value, str) and not value:
            raise ValueError("api_key is empty; remove the key to serve without one, or set a real key")
        return value

    @field_validator("apis")
    @classmethod
    def _apis_known(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in API_NAMES:
                raise ValueError(f"unknown API '{name}'; known: {', '.join(API_NAMES)}")
        if len(set(value)) != len(value):
            raise ValueError("an API is listed twice")
        return value

    @model_validator(mode="after")
    def _remote_console_has_a_key(self) -> ProjectConfig:
        if self.console.enabled and self.console.remote and self.api_key is None and not self.api_keys:
            raise ValueError("console.remote needs the project's api_key (or api_keys): browsers on other "
                             "machines log in with it")
        return self

    @model_validator(mode="after")
    def _body_fits_a_frame(self) -> ProjectConfig:
        if self.limits.max_body_bytes is not None and self.limits.max_body_bytes < 1024:
            raise ValueError("limits.max_body_bytes must be at least 1024")
        return self


def resolve_api_keys(config: ProjectConfig, project_dir: Path) -> dict[str, bytes]:
    """Every key by name (`api_key` is named "default"); empty when the project needs none. Raises ValueError
    with the key's place for the first that cannot be read."""
    keys: dict[str, bytes] = {}
    if config.api_key is not None:
        keys["default"] = resolve_key(config.api_key, project_dir, "api_key")
    for name, source in config.api_keys.items():
        keys[name] = resolve_key(source, project_dir, f"api_keys.{name}")
    return keys


def resolve_key(source: KeySource, project_dir: Path, where: str = "api_key") -> bytes:
    """The key as bytes (compared with hmac.compare_digest on bytes, RELIABILITY 5.4)."""
    if isinstance(source, str):
        value = source
    elif isinstance(source, KeyFromEnv):
        if source.env not in os.environ:
            raise ValueError(f"{where}.env: environment variable {source.env} is not set")
        value = os.environ[source.env]
    else:
        path = Path(source.file)
        path = path if path.is_absolute() else project_dir / path
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"{where}.file: cannot read {path}: {error.strerror}") from None
    if not value:
        raise ValueError(f"{where} resolves to an empty key")
    return value.encode("utf-8")
