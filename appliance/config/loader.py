"""Load a project folder: project.yaml, its flow and the flow's nodes, reporting every problem at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from appliance.config.apis import API_SETTINGS
from appliance.config.flow import FlowSpec, validate_flow
from appliance.config.profile import FirmwareProfile, load_profile
from appliance.config.project import KeySource, ProjectConfig, resolve_key
from appliance.config.source import Problem, YamlDocument, load_yaml, validation_problems
from appliance.errors import ConfigError

if TYPE_CHECKING:
    # The output and source registries import their kinds' libraries (OpenCV for cameras): only a project that
    # lists outputs or sources imports them (tests/test_config.py: configuration loads without OpenCV).
    from appliance.outputs.base import OutputSettings
    from appliance.sources.base import SourceSettings

PROJECT_FILE = "project.yaml"


@dataclass
class ProjectFiles:
    """A project whose files validated: its folder, typed settings, key and flow."""

    directory: Path
    config: ProjectConfig
    # name -> key; empty when the project needs no key ("default" is `api_key`).
    api_keys: dict[str, bytes]
    flow: FlowSpec
    flow_path: Path
    # capability -> its flow, as `capabilities:` names them.
    capability_flows: dict[str, FlowSpec]
    profile: FirmwareProfile
    # Where the project's profile is named, for the problem when its device is absent here.
    profile_problem: Problem
    # `outputs:` and `sources:`, each validated by its kind (appliance/outputs/, appliance/sources/).
    outputs: list[OutputSettings] = field(default_factory=list)
    sources: list[SourceSettings] = field(default_factory=list)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_project_files(project_dir: Path) -> ProjectFiles:
    """Validate project.yaml and its flow file; raises ConfigError with every problem, sorted by place."""
    project_dir = project_dir.resolve()
    if not project_dir.is_dir():
        raise ConfigError([f"{project_dir}: project folder not found"])
    project_path = project_dir / PROJECT_FILE
    if not project_path.is_file():
        raise ConfigError([f"{_display(project_path)}: not found; a project folder needs a {PROJECT_FILE}"])
    doc = load_yaml(project_path, _display(project_path))
    problems: list[Problem] = list(doc.problems)
    config = None
    api_keys: dict[str, bytes] = {}
    outputs: list[OutputSettings] = []
    sources: list[SourceSettings] = []
    if not problems:
        try:
            config = ProjectConfig.model_validate(doc.data if isinstance(doc.data, dict) else {})
        except ValidationError as error:
            problems += validation_problems(doc, error, ProjectConfig)
    if config is not None:
        named: list[tuple[tuple[str, ...], str, KeySource]] = []
        if config.api_key is not None:
            named.append((("api_key",), "default", config.api_key))
        named += [(("api_keys", name), name, source) for name, source in config.api_keys.items()]
        for path, name, source in named:
            try:
                api_keys[name] = resolve_key(source, project_dir, ".".join(map(str, path)))
            except ValueError as error:
                problems.append(doc.problem(path, str(error)))
        problems += _api_settings_problems(doc, config)
        if config.outputs:
            from appliance.outputs import OUTPUT_TYPES

            outputs, output_problems = _kinds(doc, "outputs", config.outputs, OUTPUT_TYPES)
            problems += output_problems
        if config.sources:
            from appliance.sources import SOURCE_TYPES

            sources, source_problems = _kinds(doc, "sources", config.sources, SOURCE_TYPES)
            problems += source_problems
    profile = None
    if config is not None:
        profile, profile_problems = load_profile(config.firmware_profile)
        if profile_problems:
            problems.append(doc.problem(("firmware_profile",), "; ".join(
                p.message if p.file.endswith(f"{config.firmware_profile}.yaml") and not p.line else str(p)
                for p in profile_problems)))
    flow, flow_path = None, project_dir
    capability_flows: dict[str, FlowSpec] = {}
    if config is not None:
        flow, flow_path, flow_problems = _load_flow(doc, ("flow",), config.flow, project_path)
        problems += flow_problems
        for capability, reference in config.capabilities.named().items():
            found, _, found_problems = _load_flow(doc, ("capabilities", capability), reference, project_path)
            problems += found_problems
            if found is not None:
                capability_flows[capability] = found
    if problems or config is None or flow is None or profile is None:
        raise ConfigError(sorted_problems(problems))
    return ProjectFiles(project_dir, config, api_keys, flow, flow_path, capability_flows, profile,
                        doc.problem(("firmware_profile",), ""), outputs, sources)


def _load_flow(doc: YamlDocument, path: tuple[str, ...], reference: str | dict, project_path: Path
               ) -> tuple[FlowSpec | None, Path, list[Problem]]:
    """A flow named at ``path`` of project.yaml: inline (a mapping) or a file relative to the project folder."""
    if isinstance(reference, dict):
        flow, problems = validate_flow(doc.part(path))
        return flow, project_path, problems
    flow_path = (project_path.parent / reference).resolve()
    flow_doc = load_yaml(flow_path, _display(flow_path))
    if flow_doc.problems:
        if not flow_path.is_file():
            return None, flow_path, [doc.problem(path, f"flow file {_display(flow_path)} not found")]
        return None, flow_path, list(flow_doc.problems)
    flow, problems = validate_flow(flow_doc)
    return flow, flow_path, problems


def _kinds(doc: YamlDocument, key: str, items: list[dict[str, Any]], registry: dict[str, Any]
           ) -> tuple[list[Any], list[Problem]]:
    """Each entry of `outputs:` or `sources:` checked by its kind's model, `{env: ...}` values resolved, with
    their places."""
    from appliance.outputs.base import EnvValue

    found: list[Any] = []
    problems: list[Problem] = []
    for index, item in enumerate(items):
        kind = registry.get(str(item.get("type")))
        if kind is None:
            problems.append(doc.problem((key, index, "type"), f"unknown {key[:-1]} type {item.get('type')!r}; "
                                        f"known: {', '.join(registry)}"))
            continue
        try:
            settings = kind.settings_model.model_validate(item)
        except ValidationError as error:
            problems += validation_problems(doc, error, kind.settings_model, (key, index))
            continue
        for name in type(settings).model_fields:
            value = getattr(settings, name)
            if isinstance(value, EnvValue):
                try:
                    value.resolve()
                except ValueError as error:
                    problems.append(doc.problem((key, index, name), str(error)))
        found.append(settings)
    return found, problems


def _api_settings_problems(doc: YamlDocument, config: ProjectConfig) -> list[Problem]:
    """Each API's settings, checked by that API's own model, with their places in project.yaml."""
    problems: list[Problem] = []
    for name, settings in config.api_settings.items():
        if name not in config.apis:
            problems.append(doc.problem(("api_settings", name), f"settings for '{name}', which `apis` does not "
                                        f"list ({', '.join(config.apis)})", at_key=True))
            continue
        model = API_SETTINGS[name]
        try:
            model.model_validate(settings)
        except ValidationError as error:
            problems += validation_problems(doc, error, model, ("api_settings", name))
    return problems


def sorted_problems(problems: list[Problem]) -> list[str]:
    return [str(p) for p in sorted(problems, key=lambda p: (p.file, p.line, p.column))]
