"""project.yaml `apis` and `api_settings`: the vendor APIs a project can serve, and each one's settings.

The names and settings models live here, apart from the dialects that serve them (appliance/server/dialects/),
so that loading a project's configuration imports no server code (and with it neither OpenCV nor OpenVINO). The
dialect registry names the same APIs with these models; tests/test_config.py checks that the two agree. A new
API: its settings model and one line here, its folder and one registry line there.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt


class NoSettings(BaseModel):
    """An API without settings of its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DeepomaticSettings(BaseModel):
    """project.yaml `api_settings.deepomatic`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Hosts (`name` or `name:port`) whose http(s) image URLs the appliance fetches; any other URL is refused.
    url_hosts: list[str] = Field(default_factory=list)
    url_timeout_s: float = Field(5.0, gt=0, le=60)
    max_inputs: int = Field(8, ge=1, le=64, description="images per inference request")
    max_tasks: int = Field(10_000, ge=1, description="finished tasks kept for polling, the newest")
    task_ttl_s: float = Field(3600.0, gt=0, description="seconds a task is kept for polling")


class ImageRecognizeSettings(BaseModel):
    """project.yaml `api_settings.imagerecognize`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_file_bytes: PositiveInt = Field(52_428_800, description="413 above this (the document: 'Max size is 50Mb')")
    daily_quota: NonNegativeInt | None = Field(None, description="analyses per key and day; None: unlimited")
    quotas: dict[str, NonNegativeInt] = Field(default_factory=dict,
                                              description="key name -> its own daily quota (replaces daily_quota)")
    quota_file: str = Field("imagerecognize-quota.json", description="today's counts, relative to the project")
    cache_size: NonNegativeInt = Field(100, le=10_000, description="results kept per key for type=cache")


class RaypackSettings(BaseModel):
    """project.yaml `api_settings.raypack`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    license: str = Field("on-premise", description="the container's `license` field")
    url_hosts: list[str] = Field(default_factory=list, description="hosts (or host:port) whose image URLs "
                                 "`url`/`imagef` may name, e.g. a camera or file server on the line's network; "
                                 "empty: URLs are refused")
    url_timeout_s: float = Field(10.0, gt=0, le=300, description="time to fetch an image URL, in seconds")
    jpeg_quality: int = Field(90, ge=1, le=100, description="quality of /raypackfacev3's JPEG answers")


# In the dialect registry's order (appliance/server/dialects/__init__.py).
API_SETTINGS: dict[str, type[BaseModel]] = {
    "pekat": NoSettings,
    "deepomatic": DeepomaticSettings,
    "imagerecognize": ImageRecognizeSettings,
    "raypack": RaypackSettings,
    "kserve": NoSettings,
}
API_NAMES = tuple(API_SETTINGS)
