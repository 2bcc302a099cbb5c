"""The model store: `models/<name>/<version>/` with the network, spec.yaml and manifest.json, and a `current`
pointer per model, written atomically and verified before anything is loaded (RELIABILITY 11.6, 11.3).

Every writer (model supply, anomaly and segment training, the demo set-up) goes through ``publish``:

1. the spec is validated (runtime/spec.py) before anything is written;
2. the model's folder is locked (``flock`` on the folder itself), so two writers of one model take turns, and a
   staging folder found there is one a dead writer left (it held the lock while it lived): it is removed;
3. the files are written into a private staging folder (``mkdtemp`` inside the model's folder, a dot name that
   readers skip), each fsynced, then the manifest; the staging folder is verified as a loader would;
4. the folder is renamed to its version (never over an existing one: a running appliance may have it loaded),
   the model's folder fsynced, and `current` switched (`current.tmp`, fsync, `os.replace`, fsync).

A writer killed at any point before the rename leaves the store as it was (tests/runtime/test_store.py kills
`appliance train anomaly` at each point); killed between the rename and the switch, the new version is complete
and verified but not current, and the old one keeps serving.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.runtime.errors import StoreError as StoreError  # re-exported: the store's error, raised everywhere
from appliance.runtime.spec import SPEC_FILE, ModelSpec, read_spec, spec_text, validate_spec

MANIFEST_FILE = "manifest.json"
NETWORK_FILES = ("model.xml", "model.onnx", "model.tflite")
# A file of a new version: its bytes, a file to copy, or a function that writes it at the path it is given (it
# may write sidecars beside it, as OpenVINO's save_model writes model.bin beside model.xml).
FileSource = bytes | Path | Callable[[Path], object]
# tests/runtime/test_store.py: with this set to a point's name, a writer stops there (and says so on stderr) so that
# a test can kill it exactly there. The points, in order: staging, files, manifest, renamed.
PAUSE_ENV = "APPLIANCE_STORE_PAUSE"
_STAGING_MARK = ".staging-"


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
             for p in sorted(version_dir.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {"files": files}
    _write_bytes(version_dir / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def verify_manifest(version_dir: Path) -> None:
    """Check every file against ``manifest.json``; raises ``StoreError`` naming the first bad file."""
    manifest_path = version_dir / MANIFEST_FILE
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StoreError(f"{manifest_path}: missing or unreadable ({error})") from error
    present = {p.name for p in version_dir.iterdir() if p.is_file() and p.name != MANIFEST_FILE}
    if present != set(files):
        raise StoreError(f"{version_dir}: files {sorted(present)} do not match the manifest {sorted(files)}")
    for name, entry in files.items():
        actual = sha256_file(version_dir / name)
        if actual != entry["sha256"]:
            raise StoreError(f"{version_dir / name}: {name} sha256 mismatch "
                             f"(expected {entry['sha256']}, got {actual})")


def switch_current(model_dir: Path, version: str) -> None:
    """Point ``<model_dir>/current`` at ``version``: write current.tmp, fsync, os.replace, fsync the dir."""
    temporary = model_dir / "current.tmp"
    _write_bytes(temporary, version.encode())
    os.replace(temporary, model_dir / "current")
    _fsync_path(model_dir)


def point_current(store: Path, name: str, version: str) -> None:
    """Point model ``name``'s `current` at ``version`` for a person (`appliance models switch`): under the model
    folder's lock, so a training run publishing a version of the same model at that moment takes its turn, and only
    at a version whose files verify against its manifest (a half-copied version is refused, not served)."""
    model_dir = store / name
    if not model_dir.is_dir():
        raise StoreError(f"model '{name}': {model_dir} not found")
    with _locked(model_dir):
        resolve_version(store, name, version)
        switch_current(model_dir, version)


def read_current(model_dir: Path) -> str | None:
    try:
        return (model_dir / "current").read_text().strip() or None
    except FileNotFoundError:
        return None


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


def versions(model_dir: Path) -> list[str]:
    """The version folders of a model, integers in numeric order first (staging folders are not versions)."""
    if not model_dir.is_dir():
        return []
    names = [p.name for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(names, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


def next_version(model_dir: Path) -> str:
    """One more than the highest integer version (1 for a new model)."""
    return str(max((int(v) for v in versions(model_dir) if v.isdigit()), default=0) + 1)


def _check_folder_name(kind: str, value: str) -> None:
    if not value or "/" in value or "\\" in value or value.startswith(".") or value != value.strip():
        raise StoreError(f"{kind} '{value}' must be a plain name (no '/', not starting with '.')")


def _pause(point: str, where: Path) -> None:
    """The test hook of PAUSE_ENV: stop at ``point`` for a minute, long enough to be killed there."""
    if os.environ.get(PAUSE_ENV) == point:
        print(f"store: paused at {point} ({where})", file=sys.stderr, flush=True)
        time.sleep(60)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive flock on ``folder`` itself (no lock file to leave behind); the kernel drops it when the
    holder dies, so a killed writer never blocks the next one."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale_staging(parent: Path) -> None:
    """Staging folders of writers that died: every writer holds the folder's lock while its staging folder
    exists, and the caller holds it now, so any found here is stale."""
    for stale in parent.glob(".*.staging*"):  # also `.<version>.staging`, the fixed name older trainers used
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _write_source(path: Path, source: FileSource) -> None:
    if isinstance(source, bytes):
        _write_bytes(path, source)
    elif isinstance(source, Path):
        shutil.copyfile(source, path)
    else:
        source(path)
        if not path.is_file():
            raise StoreError(f"the writer of {path.name} did not write it")


def _stage_and_rename(parent: Path, final_name: str, files: Mapping[str, FileSource], spec: ModelSpec | None
                      ) -> Path:
    """Write ``files`` (and spec.yaml) into a staging folder in ``parent``, fsync, manifest, verify, rename it to
    ``final_name``. The caller holds ``parent``'s lock and has checked that ``final_name`` is free."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final_name}{_STAGING_MARK}{os.getpid()}-", dir=parent))
    try:
        # mkdtemp makes the folder private (0700); a version is read by the service's user too (systemd).
        staging.chmod(0o755)
        _pause("staging", staging)
        for file_name, source in files.items():
            _check_folder_name("file", file_name)
            if file_name == MANIFEST_FILE or (file_name == SPEC_FILE and spec is not None):
                raise StoreError(f"{file_name} is written by the store, not passed as a file")
            _write_source(staging / file_name, source)
        if spec is not None:
            _write_bytes(staging / SPEC_FILE, spec_text(spec).encode("utf-8"))
        # Sidecars written by a file's writer are fsynced too: every regular file in the folder.
        for path in staging.iterdir():
            if path.is_file():
                _fsync_path(path)
        _pause("files", staging)
        write_manifest(staging)
        _fsync_path(staging)
        # The one check of what is about to become a version: what a loader will check, on the staged files.
        verify_manifest(staging)
        if spec is not None:
            read_spec(staging)
            network_file(staging)
        _pause("manifest", staging)
        final = parent / final_name
        try:
            # On Linux a rename over an empty folder replaces it: the caller's check under the lock rules that out.
            os.rename(staging, final)
        except OSError as error:
            raise StoreError(f"{final}: cannot be written ({error.strerror})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_path(parent)
    return final


def publish(store: Path, name: str, files: Mapping[str, FileSource], spec: ModelSpec | Mapping[str, Any],
            version: str | None = None, *, make_current: bool = True) -> str:
    """Write a new version of model ``name`` in ``store`` and (``make_current``) point `current` at it; returns
    the version written (default: the next integer).

    ``files`` maps file names to their bytes, a file to copy, or a writer called with the target path; spec.yaml
    and manifest.json are written here, from ``spec`` (validated first: StoreError names every problem). A
    version that exists is never overwritten: StoreError. On any failure nothing of the new version remains.
    """
    _check_folder_name("model name", name)
    if version is not None:
        _check_folder_name("version", version)
    typed = validate_spec(spec if isinstance(spec, ModelSpec) else dict(spec), f"model '{name}' spec")
    model_dir = store / name
    model_dir.mkdir(parents=True, exist_ok=True)
    with _locked(model_dir):
        _remove_stale_staging(model_dir)
        chosen = version or next_version(model_dir)
        if (model_dir / chosen).exists():
            raise StoreError(f"model '{name}' version {chosen} exists ({model_dir / chosen}); versions are never "
                             f"overwritten, as a running appliance may have it loaded: pick another version")
        _stage_and_rename(model_dir, chosen, files, typed)
        _pause("renamed", model_dir / chosen)
        if make_current:
            switch_current(model_dir, chosen)
    return chosen


def publish_folder(folder: Path, files: Mapping[str, FileSource]) -> Path:
    """Write ``folder`` (absent) with ``files`` and a manifest, as ``publish`` writes a version: staged, fsynced,
    verified, renamed into place. For store entries that are not model versions (model supply's `_raw/`)."""
    _check_folder_name("folder", folder.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent):
        _remove_stale_staging(folder.parent)
        if folder.exists():
            raise StoreError(f"{folder} exists; it is never overwritten")
        return _stage_and_rename(folder.parent, folder.name, files, None)


def discard_broken(folder: Path) -> str:
    """Remove a version (or `_raw/` folder) that fails its manifest check; returns why it was broken. Raises
    StoreError when it verifies: a good version is never removed (a running appliance may have it loaded)."""
    try:
        verify_manifest(folder)
    except StoreError as error:
        reason = str(error)
    else:
        raise StoreError(f"{folder} verifies: a good version is never removed")
    with _locked(folder.parent):
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_STAGING_MARK}discarded-", dir=folder.parent))
        os.replace(folder, trash / folder.name)
        _fsync_path(folder.parent)
        shutil.rmtree(trash, ignore_errors=True)
    return reason
