"""appliance/firmware_profiles/*.yaml (package data; $APPLIANCE_PROFILES_DIR replaces the folder): how one kind of
Intel edge hardware is driven through OpenVINO, or (`remote:`) which KServe v2 server runs the models instead."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from appliance.config.project import KeyFromEnv, KeyFromFile, StrictModel, resolve_key
from appliance.config.source import Problem, load_yaml, validation_problems
from appliance.paths import profiles_dir as profiles_dir  # re-exported: the CLI and tests ask here

REMOTE_DEVICE = "kserve"


def checked_url(value: str) -> str:
    """A remote's base URL as `http[s]://host[:port][/path]`, without a trailing slash; ValueError otherwise. No
    user, query or fragment: the URL's host labels metrics and stands in logs and errors, a secret must not."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value[:100]!r} is not an http:// or https:// URL with a host (e.g. http://10.0.0.5:8000)")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError("the URL must not carry a user, password, query or fragment (give a key as api_key)")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise ValueError(f"{value[:100]!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class CircuitBreaker(StrictModel):
    """After `failures` inference calls in a row fail (connection, timeout, 5xx, a broken answer), calls fail at
    once for `cool_down_s`; then one call is let through, and its success closes the breaker again."""

    failures: PositiveInt = Field(default=5, le=1000, description="consecutive failed calls that open the breaker")
    cool_down_s: PositiveFloat = Field(default=10.0, le=3600, description="seconds open before one call is tried again")


class RemoteSettings(StrictModel):
    """`remote:` of a firmware profile: the project's models run on a KServe v2 (Open Inference Protocol) server
    (OpenVINO Model Server, Triton, KServe, another appliance's `kserve` API) instead of this process
    (runtime/remote.py, docs/remote.md)."""

    url: str | KeyFromEnv = Field(description="the server's base URL, e.g. http://10.0.0.5:8000, or "
                                  "{env: APPLIANCE_KSERVE_URL}")
    api_key: KeyFromEnv | KeyFromFile | None = Field(None, description="sent as `Authorization: Bearer`; from the "
                                                      "environment or a file only, never in the profile itself")
    timeout_s: PositiveFloat = Field(5.0, le=300, description="one HTTP request at most, connecting included")
    retries: int = Field(2, ge=0, le=10, description="more tries of a request that was not served: connection "
                         "refused or failed, or 503; never a timeout or another error (the server may have run it)")
    retry_backoff_s: float = Field(0.05, ge=0, le=10, description="wait before the first retry, doubled each time")
    breaker: CircuitBreaker = CircuitBreaker()
    slots: PositiveInt = Field(4, le=256, description="requests in flight at once (the connection pool's size)")
    models: dict[str, str] = Field(default_factory=dict, description="store name -> the remote's name, where "
                                   "they differ (default: the store name)")
    send_version: bool = Field(False, description="ask for the store's version (/versions/{v}); off: the remote's "
                               "default version")
    binary_tensors: bool = Field(True, description="the binary tensor extension both ways; off: JSON tensors")
    input: Literal["auto", "frames", "network"] = Field(
        "auto", description="what the remote model takes: frames (u8 BGR NHWC at the spec's size, as another "
        "appliance serves it), network (the network's own input as spec.yaml describes it: the appliance "
        "converts, scales and transposes), auto (from the remote's metadata)")

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str | KeyFromEnv) -> str | KeyFromEnv:
        return checked_url(value) if isinstance(value, str) else value

    def resolved_url(self) -> str:
        """The base URL, read from the environment if the profile says so; ValueError naming what is missing."""
        if isinstance(self.url, str):
            return self.url
        text = resolve_key(self.url, Path.cwd(), "remote.url").decode("utf-8")
        try:
            return checked_url(text)
        except ValueError as error:
            raise ValueError(f"remote.url.env: {self.url.env}: {error}") from None

    def remote_name(self, store_name: str) -> str:
        return self.models.get(store_name, store_name)


class FirmwareProfile(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    description: str
    # An OpenVINO device name: CPU, GPU, GPU.0, NPU, or a virtual device such as AUTO:NPU,GPU,CPU.
    device: str = Field(min_length=3)
    # OpenVINO properties passed to compile_model, e.g. PERFORMANCE_HINT: THROUGHPUT. The CPU's default
    # precision is bf16 where the CPU has it, which moves calibrated anomaly scores between PCs: pin it.
    properties: dict[str, str | int | bool] = Field(default_factory=dict)
    cache: bool = Field(True, description="compile through OpenVINO's model cache (CACHE_DIR)")
    static_shapes: bool = Field(False, description="reshape every model to fixed input sizes (the NPU needs it)")
    needs: list[str] = Field(default_factory=list, description="drivers, device nodes and groups, for people")
    fallback: str | None = Field(None, description="device used when `device` is absent, if allowed")
    allow_fallback: bool = False
    performance: Literal["latency", "throughput"] = "throughput"
    # Set: the models run on this KServe v2 server, and `device` is "kserve" (the OpenVINO keys do not apply).
    remote: RemoteSettings | None = None

    @model_validator(mode="after")
    def _remote_has_its_device(self) -> FirmwareProfile:
        if self.remote is not None and self.device != REMOTE_DEVICE:
            raise ValueError(f"a profile with `remote` runs its models there: device must be '{REMOTE_DEVICE}'")
        if self.remote is None and self.device == REMOTE_DEVICE:
            raise ValueError(f"device '{REMOTE_DEVICE}' needs `remote: {{url: ...}}` saying which server")
        return self


def load_profile(name: str, directory: Path | None = None) -> tuple[FirmwareProfile | None, list[Problem]]:
    directory = directory or profiles_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml"))) or "none"
        return None, [Problem(str(path), 0, 0, "", f"firmware profile '{name}' not found; known: {known}")]
    doc = load_yaml(path)
    if doc.problems:
        return None, doc.problems
    try:
        return FirmwareProfile.model_validate(doc.data), []
    except ValidationError as error:
        return None, validation_problems(doc, error, FirmwareProfile)


def all_profiles(directory: Path | None = None) -> dict[str, FirmwareProfile | list[Problem]]:
    directory = directory or profiles_dir()
    found: dict[str, FirmwareProfile | list[Problem]] = {}
    for path in sorted(directory.glob("*.yaml")):
        profile, problems = load_profile(path.stem, directory)
        found[path.stem] = profile if profile is not None else problems
    return found


def reshape_refused(profile_name: str) -> str | None:
    """Why a node may not reshape its model under the project's firmware profile, or None: a remote server serves
    a model at the one shape it was given (runtime/remote.py refuses it at load too). For the `check` of node
    types that ask a reshape (ocr@1), so that `appliance check` says it with the node's place."""
    profile, _ = load_profile(profile_name)
    if profile is None or profile.remote is None:
        return None
    return (f"firmware profile '{profile_name}' runs the models on a remote KServe server, which serves each model "
            "at one shape, and this node reshapes its models; use a local profile (cpu, igpu, npu)")
