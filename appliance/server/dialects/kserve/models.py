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

from appliance.errors import ApplianceError, BadRequest, NotFound
from appliance.runtime.compiled import ELEMENT_DATATYPES, CompiledModel
from appliance.runtime.models import ModelSlot, Runtime
from appliance.runtime.store import StoreError, network_file
from appliance.server.dialects.kserve.tensors import TensorSpec

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


@dataclass(frozen=True)
class Signature:
    """What one loaded version takes and gives, read once from its compiled model."""

    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    platform: str


# Read on the event loop only (the handlers resolve the version before the worker runs it).
_SIGNATURES: weakref.WeakKeyDictionary[CompiledModel, Signature] = weakref.WeakKeyDictionary()


def signature(loaded: CompiledModel, store: Path) -> Signature:
    """The model's input as the appliance compiled it (u8 BGR NHWC; a height and width of -1 where the graph
    resizes any frame) and its outputs, from the backend's description (OpenVINO or remote alike)."""
    found = _SIGNATURES.get(loaded)
    if found is not None:
        return found
    described = loaded.input
    shape = described.shape
    if described.any_size:
        # The graph would resize any frame, but clients are promised the size the nodes give the model (and
        # tensors are checked against it): another size is refused saying which one to send.
        shape = (shape[0], *loaded.input_size, shape[3])
    given = TensorSpec(described.name,
                       ELEMENT_DATATYPES.get(described.element_type, described.element_type.upper()), shape)
    outputs = tuple(TensorSpec(output.name, output.datatype, output.shape) for output in loaded.outputs)
    try:
        platform = PLATFORMS.get(network_file(store / loaded.name / loaded.version).suffix, "openvino")
    except StoreError:
        platform = "openvino"  # the version's folder went away since it was loaded
    found = _SIGNATURES[loaded] = Signature(given, outputs, platform)
    return found


class ServedModels:
    """The lookup of a model and version named in a KServe path, and the versions pinned by those paths."""

    def __init__(self) -> None:
        self.pinned: OrderedDict[tuple[Path, str, str], CompiledModel] = OrderedDict()
        self._loading = asyncio.Lock()

    def slot(self, runtime: Runtime, name: str) -> ModelSlot:
        slots = served_slots(runtime)
        slot = slots.get(name)
        if slot is None:
            raise NotFound(f"unknown model '{name[:100]}'; this project serves {', '.join(slots) or 'no model'} "
                           "(the models its flows use, by store name)")
        return slot

    def running(self, runtime: Runtime, name: str) -> CompiledModel:
        current = self.slot(runtime, name).current
        if current is None:
            raise ApplianceError(f"model '{name}' is not loaded", status=503, headers={"Retry-After": "1"})
        return current

    async def version(self, runtime: Runtime, name: str, version: str) -> CompiledModel:
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
    def _load(runtime: Runtime, slot: ModelSlot, version: str) -> CompiledModel:
        # The flow's slot options: the same device and input shape as the running version.
        device = None if slot.options == runtime.options else slot.options.device
        pinned = runtime.pinned(version).slot(slot.name, device, slot.input_shape,
                                              own_size=not slot.options.resize_in_graph)
        try:
            loaded = pinned.load()
        except StoreError as error:
            raise BadRequest(f"model '{slot.name}' version {version} cannot be loaded: {error}") from None
        log.info("kserve: model %s version %s loaded beside version %s for /versions/%s", slot.name, version,
                 slot.current.version if slot.current else "none", version)
        return loaded
