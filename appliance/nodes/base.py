"""What every node type shares: its settings model and the Node interface the flow runner calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.errors import NodeError as NodeError  # re-exported: nodes raise it from here
from appliance.runtime.spec import LabelSpec, ModelSpec, read_spec, spec_tasks
from appliance.runtime.store import StoreError, resolve_version

if TYPE_CHECKING:
    from appliance.config.project import ProjectConfig
    from appliance.context import Context
    from appliance.runtime.compiled import CompiledModel
    from appliance.runtime.models import Runtime


class NodeSettings(BaseModel):
    """Settings common to every node; each node type adds its own fields and a `type: Literal["name@N"]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="the node type and its version, `name@N`")
    next: list[str] = Field(default_factory=list, description="ids of the nodes that follow this one")
    description: str = Field("", description="a note for people; the flow ignores it")


# The one declaration of the query parameters a request may set for a node (when the flow lists them in the
# node's `overrides`), with the range each accepts; a node type narrows them (`override_ranges` of its settings).
# The server reads the ranges of the flow's nodes (Project.override_ranges) and refuses anything else with a 400.
Overridable = Literal["threshold", "max_labels", "min_confidence"]
OVERRIDABLE: tuple[str, ...] = get_args(Overridable)
OVERRIDE_RANGES: dict[str, tuple[float, float]] = {"threshold": (0.0, 1.0), "min_confidence": (0.0, 1.0),
                                                   "max_labels": (1, 1000)}


class DeviceSettings(NodeSettings):
    """Settings of a node that runs models of the project's store."""

    device: str | None = Field(None, description="OpenVINO device for this node's models instead of the profile's")


class OverridableSettings(NodeSettings):
    """Settings of a node some of whose values a request may replace."""

    # Which of OVERRIDABLE this node type takes, and in what range (anomaly scores are distances, not
    # probabilities: any positive threshold).
    override_ranges: ClassVar[dict[str, tuple[float, float]]] = OVERRIDE_RANGES
    overrides: list[Overridable] = Field(default_factory=list, description="query parameters a request may "
                                         "set for this node, e.g. [threshold, max_labels]")

    @field_validator("overrides")
    @classmethod
    def _taken_by_this_type(cls, overrides: list[str]) -> list[str]:
        refused = [name for name in overrides if name not in cls.override_ranges]
        if refused:
            raise ValueError(f"a request cannot set {', '.join(refused)} here; this node type takes "
                             f"{', '.join(cls.override_ranges)}")
        return overrides


class ModelNodeSettings(DeviceSettings, OverridableSettings):
    """Settings of a node that runs one model of the project's store."""

    model: str = Field(min_length=1, description="model name in the project's model store")


Problems = list[tuple[tuple[str | int, ...], str]]


SpecT = TypeVar("SpecT", bound=ModelSpec)


def stored_spec(name: str, env: NodeEnvironment, kind: type[SpecT], field: str = "model",
                tasks: tuple[str, ...] | None = None) -> tuple[SpecT | None, Problems]:
    """The typed spec of model ``name``'s current version in the project's store, or the problem (at ``field``)
    that it is missing, unverifiable or of another task than ``tasks`` (default: every task of ``kind``); for
    model nodes' `check`."""
    tasks = tasks or spec_tasks(kind)
    store = env.project_dir / env.config.models_dir
    try:
        spec = read_spec(resolve_version(store, name))
    except StoreError as error:
        return None, [((field,), f"{error}; put a version in {store / name}/<version>/ "
                                 "(network, spec.yaml, manifest.json) and name it in its `current` file")]
    if spec.task not in tasks or not isinstance(spec, kind):
        return None, [((field,), f"model '{name}' is a {spec.task} model, not a {' or '.join(tasks)} model")]
    return spec, []


def spec_of(loaded: CompiledModel, kind: type[SpecT]) -> SpecT:
    """The loaded version's spec as ``kind``; a NodeError when a switch brought a model of another task."""
    if not isinstance(loaded.spec, kind):
        raise NodeError(f"model '{loaded.name}' version {loaded.version} is a {loaded.spec.task} model, not a "
                        f"{' or '.join(spec_tasks(kind))} model")
    return loaded.spec


def requested(ctx: Context, settings: NodeSettings, name: Overridable, configured: Any) -> Any:
    """The request's value of ``name`` when this node allows it (``overrides``), else ``configured``."""
    if name in getattr(settings, "overrides", ()):
        value = (ctx.get("request") or {}).get(name)
        if value is not None:
            return value
    return configured


def label_name(label: LabelSpec, ctx: Context) -> str:
    """The label's name in the request's ``lang`` (``de-AT`` falls back to ``de``), else its default name."""
    lang = (ctx.get("request") or {}).get("lang")
    if lang and label.names:
        return label.names.get(lang) or label.names.get(lang.split("-")[0]) or label.name
    return label.name


@dataclass
class NodeEnvironment:
    """What a node may need from its project when it is checked or built."""

    project_dir: Path
    config: ProjectConfig
    code_allowed: bool = True
    runtime: Runtime | None = None
    extras: dict[str, Any] = field(default_factory=dict)


SettingsT = TypeVar("SettingsT", bound=NodeSettings)


class Node(Generic[SettingsT]):
    """A node is a synchronous function of the context, run in a worker thread, never on the event loop."""

    settings_model: ClassVar[type[NodeSettings]]
    # True when the node's result on a grey frame is its result on that frame's BGR conversion (cv2.COLOR_GRAY2BGR,
    # what `color: bgr` applies): it ignores colour, or converts grey itself that same way. A flow of such nodes
    # gets a Mono8 camera's frames grey (server/acquisition.py), which spares the conversion of every frame. Not
    # for Code hooks (promised BGR), fills that take a colour (mask, rotate) or nodes that cut colour chips (faces).
    takes_gray: ClassVar[bool] = False

    @property
    def override_ranges(self) -> dict[str, tuple[float, float]]:
        """The range of each query parameter a request may set for this node type (OverridableSettings)."""
        return dict(getattr(self.settings_model, "override_ranges", {}))

    def __init__(self, node_id: str, settings: SettingsT, env: NodeEnvironment):
        self.id = node_id
        self.settings = settings
        self.env = env

    @classmethod
    def check(cls, settings: SettingsT, env: NodeEnvironment) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems that pydantic cannot see (missing files, refused features), as (settings path, message)."""
        return []

    def prepare(self) -> None:
        """Heavy set-up (loading a hook, compiling a model); runs once in a worker thread before readiness."""

    def unavailable(self) -> str | None:
        """Why this prepared node cannot answer right now (e.g. nobody enrolled in its gallery), or None. An API
        asking for a capability whose flow has such a node answers its own "not installed" error."""
        return None

    def run(self, ctx: Context) -> None:
        raise NotImplementedError


def type_tag(settings_model: type[BaseModel]) -> str:
    """The `name@N` tag of a settings model, read from its `type: Literal[...]` annotation."""
    annotation = settings_model.model_fields["type"].annotation
    (tag,) = getattr(annotation, "__args__", (None,))
    if not isinstance(tag, str):
        raise TypeError(f"{settings_model.__name__}.type must be Literal['name@N']")
    return tag
