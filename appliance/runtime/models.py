"""Model slots: each model a project's nodes use, compiled once per version by the backend the firmware profile
chooses (runtime/openvino.py in this process, runtime/remote.py on a KServe v2 server; both `CompiledModel`s),
inferred from worker threads, swapped between versions without a gap (RELIABILITY 12).

Nodes hold a `ModelSlot` and read `slot.current` once per frame, so a request that started on one version
finishes on it while a new version is compiled beside it and then put in place with one assignment.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from appliance.config.profile import FirmwareProfile, RemoteSettings
from appliance.paths import openvino_cache
from appliance.runtime.compiled import CompiledModel, InputShape
from appliance.runtime.openvino import OpenVinoModel
from appliance.runtime.store import StoreError, read_current, resolve_version, switch_current

log = logging.getLogger(__name__)


def usable_cache_dir(path: Path | None) -> Path | None:
    """OpenVINO silently skips a read-only cache (RELIABILITY 11.5): check by writing, and say so."""
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError:
        log.warning("model cache disabled: %s not writable", path)
        return None
    return path


@dataclass(frozen=True)
class RuntimeOptions:
    """How a project's models are compiled and run: what the firmware profile says, resolved on this machine."""

    device: str
    properties: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    # The NPU compiles only static shapes: no dynamic dimension, no resize in the graph (nodes resize).
    static_shapes: bool = False
    # PERFORMANCE_HINT where `properties` do not set one (LATENCY: one request on all cores; THROUGHPUT: streams).
    performance: Literal["latency", "throughput"] | None = None
    # Set: every model runs on this KServe v2 server (runtime/remote.py), none in this process.
    remote: RemoteSettings | None = None
    # False: the model takes frames at its own size only and the node resizes (`Runtime.slot`'s `own_size`). A
    # resize in the graph needs a dynamic height and width, which cost 2-4 ms per inference of a 256x256 anomaly
    # model on 2 cores even when the frame already has that size (1.4-1.6 ms of it the no-op resize).
    resize_in_graph: bool = True

    @classmethod
    def from_profile(cls, profile: FirmwareProfile, device: str, cache_dir: Path | None) -> RuntimeOptions:
        # The profile's PERFORMANCE_HINT property, where it sets one, is what `performance` means for every
        # device of the project (a node's own device included).
        hint = str(profile.properties.get("PERFORMANCE_HINT", profile.performance)).lower()
        return cls(device, dict(profile.properties), usable_cache_dir(cache_dir) if profile.cache else None,
                   static_shapes=profile.static_shapes,
                   performance="latency" if hint == "latency" else "throughput", remote=profile.remote)

    def for_device(self, device: str) -> RuntimeOptions:
        """A node's own device: the profile's properties are for the profile's device, its quirks still hold."""
        return replace(self, device=device, properties={})


class RuntimeObserver(Protocol):
    """What the runtime reports (the server's metrics implement it)."""

    def inference(self, model: CompiledModel, seconds: float) -> None: ...

    def model_loaded(self, name: str, swapped: bool) -> None: ...

    def model_load_failed(self, name: str) -> None: ...


# The OpenVINO backend under the name its callers (training, supply, benches) have always used.
LoadedModel = OpenVinoModel


_POINTER_LOCKS: dict[Path, threading.RLock] = {}
_POINTER_LOCKS_GUARD = threading.Lock()


def pointer_lock(model_dir: Path) -> threading.RLock:
    """The lock of one model's `current` pointer and of the versions its slots run, shared by every slot of that
    model in this process (a reloaded project's runtime too). Reading the pointer and swapping a slot to it, or
    compiling a version, writing the pointer and swapping the slots to it, happen under it, so the pointer
    follower can never see a slot swapped before the pointer that confirms it (RELIABILITY 12.1)."""
    with _POINTER_LOCKS_GUARD:
        return _POINTER_LOCKS.setdefault(model_dir, threading.RLock())


class ModelSlot:
    """The current version of one named model, and the switch to another version."""

    def __init__(self, store: Path, name: str, options: RuntimeOptions, runtime: Runtime,
                 input_shape: InputShape | None = None):
        self.store, self.name, self.options, self.runtime = store, name, options, runtime
        self.input_shape = input_shape
        self.current: CompiledModel | None = None
        self.failed_version: str | None = None
        self.lock = pointer_lock(store / name)

    @property
    def follows_pointer(self) -> bool:
        return True

    def _compile(self, version: str | None) -> CompiledModel:
        observer = self.runtime.observer
        try:
            version_dir = resolve_version(self.store, self.name, version)
            loaded: CompiledModel
            if self.options.remote is not None:
                from appliance.runtime.remote import RemoteModel

                loaded = RemoteModel(self.name, version_dir, self.options.remote, observer, self.input_shape)
            else:
                loaded = OpenVinoModel(self.name, version_dir, self.options, observer, self.input_shape)
        except StoreError:
            if observer is not None:
                observer.model_load_failed(self.name)
            raise
        if observer is not None:
            observer.model_loaded(self.name, swapped=self.current is not None)
        return loaded

    def load(self) -> CompiledModel:
        with self.lock:  # a switch of this model finishes first: the slot loads what it confirmed
            self.current = self._compile(None)
        log.info("model %s: version %s on %s (%s) ready in %.2f s", self.name, self.current.version,
                 self.options.device, self.current.precision, self.current.load_seconds)
        return self.current

    def install(self, new: CompiledModel) -> None:
        """Put a compiled version in place with one assignment (requests holding the old one finish on it)."""
        old = self.current
        self.current = new
        self.failed_version = None
        log.info("model %s: %s -> %s (compiled in %.2f s)", self.name, old.version if old else "none",
                 new.version, new.load_seconds)

    def pointer_moved(self) -> bool:
        """Whether `current` names another version than the one running (and not one that failed to load)."""
        wanted = read_current(self.store / self.name)
        return (wanted is not None and self.current is not None and wanted != self.current.version
                and wanted != self.failed_version)


class PinnedSlot(ModelSlot):
    """A slot that loads one fixed version and never follows the `current` pointer."""

    def __init__(self, store: Path, name: str, options: RuntimeOptions, runtime: Runtime, version: str,
                 input_shape: InputShape | None = None):
        super().__init__(store, name, options, runtime, input_shape)
        self.version = version

    @property
    def follows_pointer(self) -> bool:
        return False

    def load(self) -> CompiledModel:
        self.current = self._compile(self.version)
        return self.current

    def pointer_moved(self) -> bool:
        return False


class Runtime:
    """The models of one project: loaded once each, on the device its firmware profile resolved to."""

    def __init__(self, store: Path, options: RuntimeOptions):
        self.store = store
        self.options = options
        self.slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        # Set by the server before the models load; None in tests and benchmarks that run a project bare.
        self.observer: RuntimeObserver | None = None
        # A reloaded project's runtime takes the slots its predecessor already loaded (see successor()).
        self._inherited: dict[str, ModelSlot] = {}

    def slot(self, name: str, device: str | None = None, input_shape: InputShape | None = None,
             own_size: bool = False) -> ModelSlot:
        """The slot of model ``name`` (made on first use): on ``device`` (default: the profile's), at
        ``input_shape``, or, with ``own_size``, taking frames at the model's own size only (no resize in the graph:
        the node resizes)."""
        key = f"{name}@{device}" if device else name
        if input_shape is not None:
            key += "[{}x{}x{}]".format(*input_shape)
        if own_size:
            key += "[own size]"
        with self._lock:
            if key not in self.slots:
                inherited = self._inherited.get(key)
                if inherited is not None:
                    self.slots[key] = inherited
                else:
                    options = self.options if device is None else self.options.for_device(device)
                    if own_size:
                        options = replace(options, resize_in_graph=False)
                    self.slots[key] = self._new_slot(name, options, input_shape)
            return self.slots[key]

    def _new_slot(self, name: str, options: RuntimeOptions, input_shape: InputShape | None) -> ModelSlot:
        return ModelSlot(self.store, name, options, self, input_shape)

    def successor(self) -> Runtime:
        """A runtime for a reloaded project: same store, device and observer; a slot its nodes ask for that this
        runtime has loaded is the same slot (no compile, no second copy in memory), until `end_inheritance`."""
        runtime = Runtime(self.store, self.options)
        runtime.observer = self.observer
        with self._lock:
            runtime._inherited = dict(self.slots)
        return runtime

    def end_inheritance(self) -> None:
        """Forget the predecessor's slots (those this runtime did not take are freed with their project)."""
        with self._lock:
            self._inherited = {}

    def take_over(self) -> None:
        """This runtime serves now: its slots report to it (a predecessor's runtime is then free to go)."""
        with self._lock:
            for slot in self.slots.values():
                slot.runtime = self

    def pinned(self, version: str) -> Runtime:
        """A runtime whose slots load ``version`` of their model, whatever `current` says. Its slots are its
        own: the server's health, metrics and pointer follower see only this runtime's."""
        return PinnedRuntime(self, version)

    def _following(self, name: str | None = None) -> dict[str, list[ModelSlot]]:
        """The slots that follow `current` pointers, by model name."""
        by_name: dict[str, list[ModelSlot]] = {}
        with self._lock:
            for slot in self.slots.values():
                if slot.follows_pointer and (name is None or slot.name == name):
                    by_name.setdefault(slot.name, []).append(slot)
        return by_name

    def switch(self, name: str, version: str) -> str | None:
        """Compile ``version`` of model ``name`` beside the running one for each of its slots, point `current`
        at it, then swap every slot; returns the version that ran before. Under the model's pointer lock, so
        the pointer follower sees the pointer and the slots agree. If a slot's compile (or the pointer's write)
        fails, no slot is swapped and the pointer stays: raises StoreError, and the old version keeps serving."""
        slots = self._following(name).get(name, [])
        if not slots:
            raise StoreError(f"model '{name}' is not loaded by this project")
        with slots[0].lock:
            previous = slots[0].current.version if slots[0].current else None
            try:
                compiled = [slot._compile(version) for slot in slots]
            except StoreError:
                for slot in slots:
                    slot.failed_version = version
                raise
            try:
                switch_current(self.store / name, version)
            except OSError as error:
                raise StoreError(f"model '{name}': version {version} compiled, but {self.store / name / 'current'} "
                                 f"cannot be written ({error.strerror}); the old version keeps serving") from None
            for slot, new in zip(slots, compiled, strict=True):
                slot.install(new)
            return previous

    def refresh(self) -> list[str]:
        """Swap every model whose `current` pointer moved (polled by the server); returns what changed. The
        pointer is read and compared under the model's lock, and the version read is the one compiled: a switch
        confirmed meanwhile (which writes the pointer before it swaps) is never undone."""
        changed = []
        for name, slots in self._following().items():
            with slots[0].lock:
                wanted = read_current(self.store / name)
                stale = [slot for slot in slots if slot.pointer_moved()]
                if wanted is None or not stale:
                    continue
                try:
                    compiled = [slot._compile(wanted) for slot in stale]
                except StoreError as error:
                    for slot in stale:
                        slot.failed_version = wanted
                    log.error("model %s: new version not loaded, the old one keeps serving: %s", name, error)
                    continue
                for slot, new in zip(stale, compiled, strict=True):
                    slot.install(new)
                changed.append(f"{name} {wanted}")
        return changed


def default_cache_dir(project_dir: Path) -> Path:
    """systemd's CacheDirectory= (CACHE_DIRECTORY), else $XDG_CACHE_HOME, else the project's own .cache folder."""
    return openvino_cache(project_dir)


class PinnedRuntime(Runtime):
    def __init__(self, base: Runtime, version: str):
        super().__init__(base.store, base.options)
        self.observer = base.observer
        self.version = version

    def _new_slot(self, name: str, options: RuntimeOptions, input_shape: InputShape | None) -> ModelSlot:
        return PinnedSlot(self.store, name, options, self, self.version, input_shape)
