"""Deepomatic's private recognition specs and recognition versions, kept in `<project>/.deepomatic/specs.json`.

Every (model, version) folder of the project's model store with a classify, detect or faces model is a
recognition version with a stable integer id, given the first time the store is read and kept in the same file,
so that `current_version_id` keeps meaning the same model version across restarts. A version made with
`POST /v0.7/recognition/versions/` belongs to one spec and runs one of those store versions.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import BadRequest
from appliance.runtime.spec import LabelSpec, read_spec
from appliance.runtime.store import StoreError, read_current

log = logging.getLogger(__name__)

ROIS = ("NONE", "BBOX")
# The model tasks a spec can run, and the region of interest their labels come with.
TASK_ROI = {"classify": "NONE", "detect": "BBOX", "faces": "BBOX"}
MAX_LABELS = 10_000
MAX_NAME = 256
MAX_DESCRIPTION = 10_000


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def shown(value: Any) -> str:
    """A value for an error message, short."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_outputs(value: Any) -> list[dict[str, Any]]:
    """The spec's `outputs`: exactly one labels output with roi NONE or BBOX and unique label ids and names."""
    example = 'e.g. [{"labels": {"roi": "NONE", "exclusive": true, "labels": [{"id": 0, "name": "ok"}]}}]'
    if not isinstance(value, list) or len(value) != 1:
        raise BadRequest(f"outputs must be a list of one output object, {example}")
    output = value[0]
    if not isinstance(output, dict) or set(output) != {"labels"}:
        raise BadRequest(f"outputs[0] must be an object with one key 'labels', {example}")
    labels = output["labels"]
    if not isinstance(labels, dict):
        raise BadRequest("outputs[0].labels must be an object with roi, exclusive and labels")
    unknown = sorted(set(labels) - {"roi", "exclusive", "labels"})
    if unknown:
        raise BadRequest(f"outputs[0].labels: unknown field {unknown[0]!r}; fields: roi, exclusive, labels")
    roi = labels.get("roi")
    if roi not in ROIS:
        raise BadRequest(f"outputs[0].labels.roi must be NONE or BBOX, got {shown(roi)}")
    exclusive = labels.get("exclusive", True)
    if not isinstance(exclusive, bool):
        raise BadRequest(f"outputs[0].labels.exclusive must be true or false, got {shown(exclusive)}")
    items = labels.get("labels")
    if not isinstance(items, list) or not items:
        raise BadRequest("outputs[0].labels.labels must be a non-empty list of {\"id\": int, \"name\": string}")
    if len(items) > MAX_LABELS:
        raise BadRequest(f"outputs[0].labels.labels has {len(items)} labels; at most {MAX_LABELS}")
    ids: set[int] = set()
    names: set[str] = set()
    clean = []
    for index, item in enumerate(items):
        where = f"outputs[0].labels.labels[{index}]"
        if not isinstance(item, dict) or set(item) != {"id", "name"}:
            raise BadRequest(f"{where} must be {{\"id\": int, \"name\": string}}, got {shown(item)}")
        label_id, name = item["id"], item["name"]
        if not isinstance(label_id, int) or isinstance(label_id, bool):
            raise BadRequest(f"{where}.id must be an integer, got {shown(label_id)}")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise BadRequest(f"{where}.name must be a non-empty string of at most {MAX_NAME} characters")
        if label_id in ids:
            raise BadRequest(f"{where}.id {label_id} is given twice")
        if name.strip().lower() in names:
            raise BadRequest(f"{where}.name {name!r} is given twice (names are compared without case)")
        ids.add(label_id)
        names.add(name.strip().lower())
        clean.append({"id": label_id, "name": name})
    return [{"labels": {"roi": roi, "exclusive": exclusive, "labels": clean}}]


def text_field(fields: dict[str, Any], name: str, *, required: bool, limit: int) -> str | None:
    value = fields.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required")
        return None
    if not isinstance(value, str) or len(value) > limit or (required and not value.strip()):
        raise BadRequest(f"{name} must be a {'non-empty ' if required else ''}string of at most {limit} characters")
    return value


def metadata_field(value: Any) -> dict[str, Any]:
    if isinstance(value, str):  # a form field carries JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRequest("metadata must be a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest(f"metadata must be a JSON object, got {shown(value)}")
    return value


def integer_id(value: Any, name: str) -> int | None:
    """An id from JSON (int or null) or a form (text)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer or null, got {shown(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise BadRequest(f"{name} must be an integer or null, got {shown(value)}")


@dataclass(frozen=True)
class StoredModel:
    """One version folder of the model store that a spec can run."""

    model: str
    version: str
    task: str
    labels: tuple[LabelSpec, ...]
    exclusive: bool
    modified: float

    @property
    def roi(self) -> str:
        return TASK_ROI[self.task]

    def outputs(self) -> list[dict[str, Any]]:
        return [{"labels": {"roi": self.roi, "exclusive": self.exclusive,
                            "labels": [{"id": label.id, "name": label.name} for label in self.labels]}}]


class Registry:
    """The specs and versions of one project. Changed on the event loop only; every change is written at once."""

    def __init__(self, folder: Path, store: Path):
        self.path = folder / "specs.json"
        self.store = store
        self.specs: dict[int, dict[str, Any]] = {}
        self.versions: dict[int, dict[str, Any]] = {}  # the versions made for a spec
        self.store_ids: dict[str, int] = {}  # "model@version" -> id
        self.next_spec = 1
        self.next_version = 1
        self._models: dict[tuple[str, str], tuple[int, StoredModel | None]] = {}  # spec.yaml mtime_ns -> model
        # stored_models also runs in a thread (reading a large spec.yaml takes 0.3 s): one at a time.
        self._scanning = threading.Lock()
        self._saving = threading.Lock()

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.specs = {int(key): value for key, value in data["specs"].items()}
            self.versions = {int(key): value for key, value in data["versions"].items()}
            self.store_ids = {str(key): int(value) for key, value in data["store_versions"].items()}
            self.next_spec = int(data["next_spec_id"])
            self.next_version = int(data["next_version_id"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("deepomatic: %s could not be read (%s); moved to %s, starting without private specs",
                      self.path, error, aside.name)
            self.specs, self.versions, self.store_ids = {}, {}, {}

    def save(self) -> None:
        """Write the file atomically: a temporary file, fsync, rename, fsync the folder. The store scan's thread
        saves too (new version ids): one writer at a time, and the text made in one C call (json.dumps)."""
        with self._saving:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"next_spec_id": self.next_spec, "next_version_id": self.next_version,
                               "store_versions": self.store_ids, "specs": {str(k): v for k, v in self.specs.items()},
                               "versions": {str(k): v for k, v in self.versions.items()}}, indent=1)
            temporary = self.path.with_name(self.path.name + ".tmp")
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            descriptor = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)

    # --- the model store ---------------------------------------------------------------------------------

    def _stored(self, model: str, version: str) -> StoredModel | None:
        path = self.store / model / version / "spec.yaml"
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return None
        cached = self._models.get((model, version))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            spec = read_spec(path.parent)
            found = (StoredModel(model, version, spec.task, tuple(spec.labels), spec.exclusive, stamp / 1e9)
                     if spec.task in TASK_ROI else None)
        except StoreError as error:
            log.warning("deepomatic: %s", error)
            found = None
        self._models[(model, version)] = (stamp, found)
        return found

    def stored_models(self) -> dict[int, StoredModel]:
        """Every store version a spec can run, by version id; new ones get their ids now (and are saved)."""
        with self._scanning:
            return self._scan()

    def _scan(self) -> dict[int, StoredModel]:
        found: dict[int, StoredModel] = {}
        new = False
        try:
            model_dirs = sorted(p for p in self.store.iterdir() if p.is_dir() and p.name[0] not in "._")
        except OSError:
            model_dirs = []
        for model_dir in model_dirs:
            for version_dir in sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name[0] != "."),
                                      key=lambda p: (len(p.name), p.name)):
                stored = self._stored(model_dir.name, version_dir.name)
                if stored is None:
                    continue
                key = f"{stored.model}@{stored.version}"
                if key not in self.store_ids:
                    self.store_ids[key] = self.next_version
                    self.next_version += 1
                    new = True
                found[self.store_ids[key]] = stored
        if new:
            self.save()
        return found

    def current_model(self, model: str) -> StoredModel | None:
        """The version the store's `current` pointer names, if a spec can run it."""
        version = read_current(self.store / model)
        return None if version is None else self._stored(model, version)

    # --- versions ----------------------------------------------------------------------------------------

    def version_json(self, version_id: int, stored: StoredModel, attached: dict[str, Any] | None) -> dict[str, Any]:
        current = read_current(self.store / stored.model) == stored.version
        base = {"id": version_id, "spec_id": None, "network_id": version_id, "post_processings": [],
                "update_date": iso(stored.modified), "model": stored.model, "model_version": stored.version,
                "model_current": current, "outputs": stored.outputs()}
        if attached is not None:
            base.update({"spec_id": attached["spec_id"], "network_id": attached["network_id"],
                         "post_processings": attached["post_processings"], "update_date": attached["update_date"]})
        return base

    def all_versions(self) -> list[tuple[int, StoredModel, dict[str, Any] | None]]:
        """(id, the store version it runs, the spec version's record or None for a store version), by id."""
        stored = self.stored_models()
        rows: list[tuple[int, StoredModel, dict[str, Any] | None]] = [(i, m, None) for i, m in stored.items()]
        for version_id, record in self.versions.items():
            model = stored.get(record["network_id"])
            if model is not None:
                rows.append((version_id, model, record))
        return sorted(rows, key=lambda row: row[0])

    def version(self, version_id: int) -> tuple[StoredModel, dict[str, Any] | None] | None:
        stored = self.stored_models()
        if version_id in stored:
            return stored[version_id], None
        record = self.versions.get(version_id)
        if record is None or record["network_id"] not in stored:
            return None
        return stored[record["network_id"]], record

    def network(self, value: Any) -> int:
        """The store version a `network_id` names: its id, or "model" (its current version) or "model@version"."""
        stored = self.stored_models()
        if isinstance(value, str) and not value.strip().isdigit():
            model, _, version = value.partition("@")
            current = self.current_model(model) if not version else None
            version = version or (current.version if current else "")
            key = f"{model}@{version}"
            if key in self.store_ids and self.store_ids[key] in stored:
                return self.store_ids[key]
            raise BadRequest(f"network_id {value!r}: no classify, detect or faces model of that name and version "
                             "in the model store; GET /v0.7/recognition/versions/ lists them")
        network = integer_id(value, "network_id")
        if network is None or network not in stored:
            raise BadRequest(f"network_id {shown(value)}: not a model version of the store; the ids of "
                             "GET /v0.7/recognition/versions/ with spec_id null are the store's model versions")
        return network

    def create_version(self, spec_id: int, network: int, post_processings: list[Any]) -> int:
        version_id = self.next_version
        self.next_version += 1
        self.versions[version_id] = {"spec_id": spec_id, "network_id": network,
                                     "post_processings": post_processings, "update_date": iso(time.time())}
        self.save()
        return version_id

    # --- specs -------------------------------------------------------------------------------------------

    def create_spec(self, name: str, description: str, metadata: dict[str, Any],
                    outputs: list[dict[str, Any]]) -> dict[str, Any]:
        spec_id = self.next_spec
        self.next_spec += 1
        spec = {"id": spec_id, "name": name, "description": description, "update_date": iso(time.time()),
                "metadata": metadata, "outputs": outputs, "current_version_id": None}
        self.specs[spec_id] = spec
        self.save()
        return spec

    def delete_spec(self, spec_id: int) -> None:
        """The spec and the versions made for it (the document: "Attached resources like recognition versions
        will also be suppressed")."""
        del self.specs[spec_id]
        for version_id in [v for v, record in self.versions.items() if record["spec_id"] == spec_id]:
            del self.versions[version_id]
        self.save()
