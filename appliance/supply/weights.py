"""Read PyTorch ``.pt``/``.pth`` state dicts into numpy arrays without importing torch.

Both on-disk formats are handled: the legacy one (several pickles in a row, then the raw storages;
the two pinned wheels of MODELS.md ship this one) and the zip one (``<prefix>/data.pkl`` plus one
``<prefix>/data/<key>`` member per storage, torch >= 1.6). Unpickling runs with a whitelist: a weight
file is data, and an unrestricted ``pickle.load`` would run whatever callable the file names.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

# torch.<Name>Storage -> numpy dtype. BFloat16 has no numpy dtype: it is widened to float32 on read.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"), "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    """Stands in for a ``torch.*Storage`` class: only its element type matters here."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                       *_ignored: Any) -> np.ndarray:
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size + stride):
        raise pickle.UnpicklingError(f"tensor with invalid layout: offset {offset}, size {size}, stride {stride}")
    if 0 not in size:
        # as_strided does no bounds check: a corrupt or hostile layout would read outside the storage.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.size:
            raise pickle.UnpicklingError(
                f"tensor of size {size} at offset {offset} reaches element {last}; its storage has {storage.size}")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride))
    # A copy: the result owns its memory, is contiguous, and cannot alias another tensor of the file.
    return np.array(view, copy=True, order="C")


def _placeholder_tensor(*_ignored: Any) -> None:
    return None


def _rebuild_parameter(data: np.ndarray, *_ignored: Any) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a plain state dict needs; storages come from ``load_storage``."""

    def __init__(self, file: IO[bytes], load_storage: Callable[[_StorageType, str, int], np.ndarray],
                 *, build_tensors: bool = True):
        super().__init__(file)
        self._load_storage = load_storage
        self._rebuild_tensor = _rebuild_tensor_v2 if build_tensors else _placeholder_tensor
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"weight file references {module}.{name}, which a state dict never needs; refusing to load it "
            f"(allowed: torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch.*Storage, "
            f"collections.OrderedDict)")

    def persistent_load(self, pid: Any) -> np.ndarray:
        # Legacy: ('storage', type, key, location, numel, view_metadata); zip: the same without the last item.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id in weight file: {pid!r:.200}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self._storages:
            self._storages[key] = self._load_storage(storage_type, key, numel)
        storage = self._storages[key]
        view_metadata = pid[5] if len(pid) == 6 else None
        if view_metadata is not None:
            _view_key, view_offset, view_size = view_metadata
            return storage[int(view_offset):int(view_offset) + int(view_size)]
        return storage


def _as_storage(raw: bytes | bytearray, storage_type: _StorageType) -> np.ndarray:
    array = np.frombuffer(raw, dtype=storage_type.dtype)
    if storage_type.name == "BFloat16Storage":
        # bfloat16 is the top half of a float32, so widening is a shift; element offsets stay the same.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _load_zip(source: IO[bytes], path: str) -> Any:
    with zipfile.ZipFile(source) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{path}: zip weight file without exactly one <prefix>/data.pkl")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise pickle.UnpicklingError(f"{path}: big-endian weight files are not supported")

        def load_storage(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
            raw = archive.read(f"{prefix}data/{key}")
            return _as_storage(raw[: numel * storage_type.dtype.itemsize], storage_type)

        with archive.open(pickles[0]) as data:
            return _RestrictedUnpickler(io.BytesIO(data.read()), load_storage).load()


def _load_legacy(file: IO[bytes], path: str) -> Any:
    file.seek(0)  # is_zipfile has read the end of the file

    def no_storage(*_: Any) -> np.ndarray:
        raise pickle.UnpicklingError(f"{path}: storage referenced outside the object pickle")

    try:
        magic = _RestrictedUnpickler(file, no_storage).load()
    except (EOFError, ValueError, IndexError, pickle.UnpicklingError) as error:
        raise pickle.UnpicklingError(f"{path}: neither a zip nor a legacy torch file ({error})") from error
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError(f"{path}: neither a zip nor a legacy torch file (bad magic number)")
    _RestrictedUnpickler(file, no_storage).load()  # protocol version
    sys_info = _RestrictedUnpickler(file, no_storage).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError(f"{path}: big-endian weight files are not supported")
    wanted: dict[str, tuple[_StorageType, int]] = {}
    storages: dict[str, np.ndarray] = {}

    # The object pickle comes before the storage bytes, so storages are placeholders until read below.
    def defer(storage_type: _StorageType, key: str, numel: int) -> np.ndarray:
        wanted[key] = (storage_type, numel)
        return np.empty(0, dtype=storage_type.dtype)

    object_start = file.tell()
    _RestrictedUnpickler(file, defer, build_tensors=False).load()
    keys = _RestrictedUnpickler(file, no_storage).load()
    for key in keys:
        if str(key) not in wanted:
            raise pickle.UnpicklingError(f"{path}: storage {key} is listed but no tensor uses it")
        storage_type, _ = wanted[str(key)]
        numel = int(np.frombuffer(file.read(8), dtype="<i8")[0])
        raw = file.read(numel * storage_type.dtype.itemsize)
        if len(raw) != numel * storage_type.dtype.itemsize:
            raise pickle.UnpicklingError(f"{path}: truncated storage {key}")
        storages[str(key)] = _as_storage(raw, storage_type)
    # Second pass over the object pickle, now that every storage is in memory.
    file.seek(object_start)
    return _RestrictedUnpickler(file, lambda _type, key, _numel: storages[key]).load()


def load_state_dict(source: str | Path | bytes) -> dict[str, np.ndarray]:
    """Read a torch state dict (legacy or zip format; a path or the file's bytes) as ``{name: array}``.

    Raises ``pickle.UnpicklingError`` when the file references anything but tensors, storages and
    OrderedDict, or when it is not a torch file.
    """
    path = "<bytes>" if isinstance(source, bytes) else str(source)
    with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as file:
        state = _load_zip(file, path) if zipfile.is_zipfile(file) else _load_legacy(file, path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {str(k): np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
