"""The models KServe clients see: every model the project's flows use, under its store name, at the version its
slot runs (the flow's own slot, so a hot swap moves both), or at a version pinned by `/versions/{v}` and loaded
from the store beside it on first use.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, BadRequest, NotFound
from appliance.runtime.models import LoadedModel, ModelSlot, Runtime
from appliance.runtime.store import StoreError, network_file
from appliance.server.dialects.kserve.tensors import OPENVINO_DATATYPES, TensorSpec

log = logging.getLogger(__name__)

# Versions other than the running one kept compiled for `/versions/{v}` (each costs its weights in memory): the
# most recently used ones.
MAX_PINNED_VERSIONS = 4
# The store's network formats, as the `platform` of model metadata: OpenVINO runs each.
PLATFORMS = {".xml": "openvino_ir", ".onnx": "openvino_onnx", ".tflite": "openvino_tflite"}


def served_slots(runtime: Runtime) -> dict[str, ModelSlot]:
    """The flows' models by store name. A model loaded at several devices or input shapes is served through the
    slot of the project's device at the model's own input size when the flow has it, else its first slot."""
    slots: dict[str, ModelSlot] = {}
    for key, slot in list(runtime.slots.items()):
        if key == slot.name or slot.name not in slots:
            slots[slot.name] = slot
    return dict(sorted(slots.items()))


def store_versions(store: Path, name: str) -> list[str]:
    """The published versions of a model in the store (folders with a manifest), numbers in numeric order."""
    try:
        found = [entry.name for entry in (store / name).iterdir()
                 if entry.is_dir() and not entry.name.startswith(".") and (entry / "manifest.json").is_file()]
    except OSError:
        return []
    return sorted(found, key=lambda version: (not version.isdigit(), int(version) if version.isdigit() else 0,
                                              version))


def _port(port: Any) -> TensorSpec:
    """An input or output of the compiled model: its name, datatype and shape (-1 for a dynamic dimension)."""
    names = port.get_names()
    name = port.get_any_name() if names else f"{port.get_index()}"
    shape = tuple(dimension.get_length() if dimension.is_static else -1 for dimension in port.get_partial_shape())
    element = port.get_element_type().get_type_name()
    return TensorSpec(name, OPENVINO_DATATYPES.get(element, element.upper()), shape)


@dataclass(frozen=True)
class Signature:
    """What one loaded version takes and gives, read once from its compiled model."""

    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    platform: str


# Read on the event loop only (the handlers resolve the version before the worker runs it).
_SIGNATURES: weakref.WeakKeyDictionary[LoadedModel, Signature] = weakref.WeakKeyDictionary()


def signature(loaded: LoadedModel, store: Path) -> Signature:
    """The compiled model's input (after the appliance's pre-processing: u8 BGR NHWC) and outputs."""
    found = _SIGNATURES.get(loaded)
    if found is not None:
        return found
    compiled = loaded.compiled
    given = _port(compiled.inputs[0])
    if loaded.spec.input.name and given.name != loaded.spec.input.name:
        given = TensorSpec(loaded.spec.input.name, given.datatype, given.shape)
    outputs = tuple(TensorSpec(name, spec.datatype, spec.shape)
                    for name, spec in zip(loaded.output_names, (_port(port) for port in compiled.outputs),
                                          strict=True))
    try:
        platform = PLATFORMS.get(network_file(store / loaded.name / loaded.version).suffix, "openvino")
    except StoreError:
        platform = "openvino"  # the version's folder went away since it was loaded
    found = _SIGNATURES[loaded] = Signature(given, outputs, platform)
    return found


class ServedModels:
    """The lookup of a model and version named in a KServe path, and the versions pinned by those paths."""

    def __init__(self) -> None:
        self.pinned: OrderedDict[tuple[Path, str, str], LoadedModel] = OrderedDict()
        self._loading = asyncio.Lock()

    def slot(self, runtime: Runtime, name: str) -> ModelSlot:
        slots = served_slots(runtime)
        slot = slots.get(name)
        if slot is None:
            raise NotFound(f"unknown model '{name[:100]}'; this project serves {', '.join(slots) or 'no model'} "
                           "(the models its flows use, by store name)")
        return slot

    def running(self, runtime: Runtime, name: str) -> LoadedModel:
        current = self.slot(runtime, name).current
        if current is None:
            raise ApplianceError(f"model '{name}' is not loaded", status=503, headers={"Retry-After": "1"})
        return current

    async def version(self, runtime: Runtime, name: str, version: str) -> LoadedModel:
        """The loaded ``version`` of model ``name``: the running one, or a version of the store compiled beside it
        (in a thread of its own: compiling takes seconds, never in a worker that frames wait for)."""
        slot = self.slot(runtime, name)
        current = slot.current
        if current is not None and current.version == version:
            return current
        versions = store_versions(runtime.store, name)
        if version not in versions:
            raise NotFound(f"model '{name}' has no version '{version[:100]}'; versions: {', '.join(versions)}")
        key = (runtime.store, name, version)
        async with self._loading:
            loaded = self.pinned.get(key)
            if loaded is None:
                loaded = await asyncio.get_running_loop().run_in_executor(None, self._load, runtime, slot, version)
                self.pinned[key] = loaded
                while len(self.pinned) > MAX_PINNED_VERSIONS:
                    self.pinned.popitem(last=False)
            self.pinned.move_to_end(key)
            return loaded

    @staticmethod
    def _load(runtime: Runtime, slot: ModelSlot, version: str) -> LoadedModel:
        # The flow's slot options: the same device and input shape as the running version.
        device = None if slot.options == runtime.options else slot.options.device
        pinned = runtime.pinned(version).slot(slot.name, device, slot.input_shape)
        try:
            loaded = pinned.load()
        except StoreError as error:
            raise BadRequest(f"model '{slot.name}' version {version} cannot be loaded: {error}") from None
        log.info("kserve: model %s version %s loaded beside version %s for /versions/%s", slot.name, version,
                 slot.current.version if slot.current else "none", version)
        return loaded
