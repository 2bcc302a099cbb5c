"""Write torch-format weight files without torch, opcode by opcode, so the loader's tests need no binary blobs.

``zip_state_dict`` writes what ``torch.save`` writes (torch >= 1.6): ``archive/data.pkl`` whose tensors are
``torch._utils._rebuild_tensor_v2`` calls on persistent storage ids, and one raw member per storage.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                  np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
                  np.dtype("int32"): "IntStorage", np.dtype("uint8"): "ByteStorage"}


def global_ref(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    encoded = value.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded


def integer(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def int_tuple(values: tuple[int, ...]) -> bytes:
    return pickle.MARK + b"".join(integer(v) for v in values) + pickle.TUPLE


def _tensor(key: str, array: np.ndarray) -> bytes:
    storage_id = (pickle.MARK + text("storage") + global_ref("torch", _STORAGE_NAMES[array.dtype]) + text(key)
                  + text("cpu") + integer(array.size) + pickle.TUPLE + pickle.BINPERSID)
    strides = tuple(s // array.itemsize for s in array.strides)
    arguments = (pickle.MARK + storage_id + integer(0) + int_tuple(array.shape) + int_tuple(strides)
                 + pickle.NEWFALSE + global_ref("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
                 + pickle.TUPLE)
    return global_ref("torch._utils", "_rebuild_tensor_v2") + arguments + pickle.REDUCE


def state_dict_pickle(state: dict[str, np.ndarray]) -> bytes:
    """data.pkl of a state dict whose storage keys are "0", "1", ... in the order of ``state``."""
    items = b"".join(text(name) + _tensor(str(i), a) for i, (name, a) in enumerate(state.items()))
    return (pickle.PROTO + b"\x02" + global_ref("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.MARK + items + pickle.SETITEMS + pickle.STOP)


def zip_state_dict(path: Path, state: dict[str, np.ndarray], data_pkl: bytes | None = None) -> Path:
    """A zip-format torch file of ``state`` (or of another ``data.pkl``, to test what the loader refuses)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl if data_pkl is not None else state_dict_pickle(state))
        archive.writestr("archive/byteorder", "little")
        for i, array in enumerate(state.values()):
            archive.writestr(f"archive/data/{i}", np.ascontiguousarray(array).tobytes())
        archive.writestr("archive/version", "3\n")
    return path


def os_system_pickle(command: str = "echo owned") -> bytes:
    """A pickle that calls os.system when loaded without restrictions."""
    return pickle.PROTO + b"\x02" + global_ref("os", "system") + text(command) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP
