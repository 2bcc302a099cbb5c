"""`appliance export`: a project folder that runs anywhere on its own, e.g. as /var/lib/appliance/<name>.

The projects in this repository point at shared files (`flow: ../../flows/x.yaml`, `models_dir: ../../models`).
A systemd unit serves /var/lib/appliance/%i, where those relative paths lead nowhere and /opt is read-only, while
model switches and retraining write into the project's own store. The export therefore copies the project
folder (without logs and caches), its flow file as `flow.yaml`, and the models its flow names: the whole store
when it is the project's own, else only the current version of each named model from the shared store.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from appliance.config.loader import PROJECT_FILE, load_project_files
from appliance.errors import ConfigError
from appliance.runtime.store import read_current

_SKIPPED = {"logs", ".cache", "__pycache__"}


class ExportError(ValueError):
    """The export cannot be made; the message says why."""


def _model_names(flow: Any, store: Path) -> set[str]:
    """Names of the store's models that the flow's node settings mention (model, det_model, rec_model, ...)."""
    names: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", value) and (store / value).is_dir():
            names.add(value)

    for node in flow.nodes.values():
        visit(node.model_dump())
    return names


def _set_key(text: str, key: str, value: str) -> str:
    """Replace a top-level `key: ...` line of project.yaml (keeping its comments), or add it."""
    pattern = re.compile(rf"^{key}:.*$", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(f"{key}: {value}", text, count=1)
    return text.rstrip("\n") + f"\n{key}: {value}\n"


def export_project(source: Path, destination: Path, models_from: Path | None = None) -> list[str]:
    """Copy ``source`` to ``destination`` as a self-contained project; returns what was done, line by line.

    ``models_from``: a store to take the named models from when the project's shared store lacks them (the
    pinned store systemd/install.sh writes from the wheelhouse, where the checkout's ``models/`` is absent)."""
    files = load_project_files(source)  # refuses an invalid project before anything is written
    if destination.exists() and any(destination.iterdir()):
        raise ExportError(f"{destination} exists and is not empty")
    kept_destination = destination.exists()
    source = files.directory
    store = (source / files.config.models_dir).resolve()
    own_store = store == (source / "models").resolve()
    done = []
    shutil.copytree(source, destination, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if n in _SKIPPED or (
                        Path(folder).resolve() == source and n == "models" and not own_store)])
    done.append(f"copied {source} -> {destination}")
    text = (destination / PROJECT_FILE).read_text(encoding="utf-8")
    if isinstance(files.config.flow, str):
        shutil.copyfile(files.flow_path, destination / "flow.yaml")
        text = _set_key(text, "flow", "flow.yaml")
        done.append(f"flow {files.flow_path.name} -> flow.yaml")
    if not own_store:
        stores = [store] + ([models_from.resolve()] if models_from is not None else [])
        names = set().union(*(_model_names(files.flow, s) for s in stores))
        for name in sorted(names):
            found = next(s for s in stores if (s / name).is_dir())
            version = read_current(found / name)
            if version is None:
                raise ExportError(f"model '{name}' in {found} has no current version")
            shutil.copytree(found / name / version, destination / "models" / name / version)
            (destination / "models" / name / "current").write_text(version)
            done.append(f"model {name} version {version} from {found}")
        text = _set_key(text, "models_dir", "models")
    (destination / PROJECT_FILE).write_text(text, encoding="utf-8")
    from appliance.project import Project

    try:
        Project.load(destination)  # the copy must load on its own, as `appliance check` would, models included
    except ConfigError:
        for child in destination.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        if not kept_destination:
            destination.rmdir()
        raise
    return done
