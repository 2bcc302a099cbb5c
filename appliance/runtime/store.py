"""The model store: `models/<name>/<version>/` with the network, spec.yaml and manifest.json, and a `current`
pointer per model, written atomically and verified before anything is loaded (RELIABILITY 11.6, 11.3).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


class StoreError(RuntimeError):
    """A model version that must not be loaded: missing, incomplete, or not what its manifest says."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, content: bytes) -> None:
    with open(path, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def write_manifest(version_dir: Path) -> dict[str, Any]:
    """Hash every file of ``version_dir`` (but the manifest) into ``manifest.json``, fsynced."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(version_dir.iterdir()) if p.is_file() and p.name != "manifest.json"}
    manifest = {"files": files}
    _write_bytes(version_dir / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def verify_manifest(version_dir: Path) -> None:
    """Check every file against ``manifest.json``; raises ``StoreError`` naming the first bad file."""
    manifest_path = version_dir / "manifest.json"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StoreError(f"{manifest_path}: missing or unreadable ({error})") from error
    present = {p.name for p in version_dir.iterdir() if p.is_file() and p.name != "manifest.json"}
    if present != set(files):
        raise StoreError(f"{version_dir}: files {sorted(present)} do not match the manifest {sorted(files)}")
    for name, entry in files.items():
        actual = sha256_file(version_dir / name)
        if actual != entry["sha256"]:
            raise StoreError(f"{version_dir / name}: {name} sha256 mismatch "
                                   f"(expected {entry['sha256']}, got {actual})")


def _publish_dir(staging: Path, final: Path) -> None:
    """Move a complete, fsynced staging dir to ``final``; a broken dir already there is replaced."""
    _fsync_path(staging)
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash)
    else:
        os.replace(staging, final)
    _fsync_path(final.parent)


def switch_current(model_dir: Path, version: str) -> None:
    """Point ``<model_dir>/current`` at ``version``: write current.tmp, fsync, os.replace, fsync the dir."""
    temporary = model_dir / "current.tmp"
    _write_bytes(temporary, version.encode())
    os.replace(temporary, model_dir / "current")
    _fsync_path(model_dir)


def read_current(model_dir: Path) -> str | None:
    try:
        return (model_dir / "current").read_text().strip() or None
    except FileNotFoundError:
        return None




NETWORK_FILES = ("model.xml", "model.onnx", "model.tflite")


def network_file(version_dir: Path) -> Path:
    """The network of a version: OpenVINO IR, ONNX or TFLite, in that order of preference."""
    for name in NETWORK_FILES:
        if (version_dir / name).is_file():
            return version_dir / name
    raise StoreError(f"{version_dir}: no network file ({', '.join(NETWORK_FILES)})")


def resolve_version(store: Path, name: str, version: str | None = None) -> Path:
    """The verified folder of `name`'s current (or given) version; raises StoreError saying what is wrong."""
    model_dir = store / name
    if version is None:
        version = read_current(model_dir)
        if version is None:
            raise StoreError(f"model '{name}': {model_dir / 'current'} not found (train or install a version)")
    version_dir = model_dir / version
    if not version_dir.is_dir():
        raise StoreError(f"model '{name}' version {version}: {version_dir} not found")
    verify_manifest(version_dir)
    network_file(version_dir)
    return version_dir
