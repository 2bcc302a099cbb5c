"""Load a project folder: project.yaml, its flow and the flow's nodes, reporting every problem at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from appliance.config.flow import FlowSpec, validate_flow
from appliance.config.profile import FirmwareProfile, load_profile
from appliance.config.project import ProjectConfig, resolve_api_key
from appliance.config.source import Problem, load_yaml, validation_problems
from appliance.errors import ConfigError

PROJECT_FILE = "project.yaml"


@dataclass
class ProjectFiles:
    """A project whose files validated: its folder, typed settings, key and flow."""

    directory: Path
    config: ProjectConfig
    api_key: bytes | None
    flow: FlowSpec
    flow_path: Path
    profile: FirmwareProfile
    # Where project.yaml names the profile, for the problem when its device is absent here.
    profile_problem: Problem


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
    api_key = None
    if not problems:
        try:
            config = ProjectConfig.model_validate(doc.data if isinstance(doc.data, dict) else {})
        except ValidationError as error:
            problems += validation_problems(doc, error, ProjectConfig)
    if config is not None:
        try:
            api_key = resolve_api_key(config, project_dir)
        except ValueError as error:
            problems.append(doc.problem(("api_key",), str(error)))
    profile = None
    if config is not None:
        profile, profile_problems = load_profile(config.firmware_profile)
        if profile_problems:
            problems.append(doc.problem(("firmware_profile",), "; ".join(
                p.message if p.file.endswith(f"{config.firmware_profile}.yaml") and not p.line else str(p)
                for p in profile_problems)))
    flow = None
    flow_path = project_dir
    if config is not None and isinstance(config.flow, dict):
        flow_path = project_path
        flow, flow_problems = validate_flow(doc.part(("flow",)))
        problems += flow_problems
    elif config is not None and isinstance(config.flow, str):
        flow_path = (project_dir / config.flow).resolve()
        flow_doc = load_yaml(flow_path, _display(flow_path))
        if flow_doc.problems:
            if not flow_path.is_file():
                problems.append(doc.problem(("flow",), f"flow file {_display(flow_path)} not found"))
            else:
                problems += flow_doc.problems
        else:
            flow, flow_problems = validate_flow(flow_doc)
            problems += flow_problems
    if problems or config is None or flow is None or profile is None:
        raise ConfigError(sorted_problems(problems))
    return ProjectFiles(project_dir, config, api_key, flow, flow_path, profile,
                        doc.problem(("firmware_profile",), ""))


def sorted_problems(problems: list[Problem]) -> list[str]:
    return [str(p) for p in sorted(problems, key=lambda p: (p.file, p.line, p.column))]
