"""What every node type shares: its settings model and the Node interface the flow runner calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from appliance.config.project import ProjectConfig
    from appliance.context import Context
    from appliance.runtime.models import Runtime


class NodeSettings(BaseModel):
    """Settings common to every node; each node type adds its own fields and a `type: Literal["name@N"]`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    next: list[str] = Field(default_factory=list, description="ids of the nodes that follow this one")
    description: str = ""


@dataclass
class NodeEnvironment:
    """What a node may need from its project when it is checked or built."""

    project_dir: Path
    config: ProjectConfig
    code_allowed: bool = True
    runtime: Runtime | None = None
    extras: dict[str, Any] = field(default_factory=dict)


SettingsT = TypeVar("SettingsT", bound=NodeSettings)


class NodeError(Exception):
    """A node could not process this frame: the flow records it in `errors`, fails the branch and answers 200."""


class Node(Generic[SettingsT]):
    """A node is a synchronous function of the context, run in a worker thread, never on the event loop."""

    settings_model: ClassVar[type[NodeSettings]]

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

    def run(self, ctx: Context) -> None:
        raise NotImplementedError


def type_tag(settings_model: type[BaseModel]) -> str:
    """The `name@N` tag of a settings model, read from its `type: Literal[...]` annotation."""
    annotation = settings_model.model_fields["type"].annotation
    (tag,) = getattr(annotation, "__args__", (None,))
    if not isinstance(tag, str):
        raise TypeError(f"{settings_model.__name__}.type must be Literal['name@N']")
    return tag
