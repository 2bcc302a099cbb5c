"""The one interface a node sees of a model: a compiled version, wherever it runs.

`runtime/openvino.py` compiles a store version in this process; `runtime/remote.py` sends the same tensors to a
KServe v2 server (OpenVINO Model Server, Triton, KServe, another appliance). A firmware profile chooses which;
nodes never know. What a backend cannot do (reshape a remote model) it refuses with a `StoreError` at load, so
`check` and startup say it, not the first frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from appliance.runtime.spec import ModelSpec

# The tensor datatypes of KServe v2 (the names TensorDescription uses) by numpy dtype (BF16 has no numpy type;
# BYTES is no tensor of numbers), and those of OpenVINO's element types (ov.Type.get_type_name()).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype) -> str | None:
    """The KServe v2 datatype of a numpy dtype in either byte order ("FP32"), None if the protocol has none."""
    return _BY_DTYPE.get(dtype.newbyteorder("="))


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    """A tensor shape as the protocol writes it in messages: [1, 224, 224, 3]."""
    return "[" + ", ".join(str(dimension) for dimension in shape) + "]"


# KServe v2's binary tensor extension: a body is a JSON header of this many bytes, then the tensors' bytes.
HEADER_LENGTH = "Inference-Header-Content-Length"


def json_header_length(value: str | None, body_size: int) -> int | None:
    """The JSON header's length a `Inference-Header-Content-Length` value gives (None when absent); ValueError
    when it is no whole number from 0 to the body's size."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or int(text) > body_size:
        raise ValueError(f"{HEADER_LENGTH} must be the JSON header's length in bytes, from 0 to the body's "
                         f"{body_size}; got {value[:40]!r}")
    return int(text)


ELEMENT_DATATYPES = {"boolean": "BOOL", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32", "u64": "UINT64",
                     "i8": "INT8", "i16": "INT16", "i32": "INT32", "i64": "INT64", "f16": "FP16", "f32": "FP32",
                     "f64": "FP64", "bf16": "BF16"}

# (batch, height, width) a node compiles a model at instead of the spec's (1, height, width); -1 leaves that
# dimension dynamic (CPU and GPU only: the NPU needs every dimension static).
InputShape = tuple[int, int, int]


@dataclass(frozen=True)
class TensorDescription:
    """One output as KServe v2 names it: its datatype ("FP32", "UINT8", "INT64"...) and shape (-1: dynamic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class InputDescription:
    """What `infer` takes: a batch of u8 BGR NHWC frames; a dimension of -1 is dynamic."""

    shape: tuple[int, int, int, int]  # (batch, height, width, channels)
    element_type: str = "u8"
    colour_order: str = "BGR"
    # True when the backend brings a frame of any size to the model itself (resize inside the graph): the node
    # then hands the frame as it is. False (a remote model, the NPU's static shapes): the node resizes first.
    any_size: bool = False
    # The input's name as clients name it (the spec's `input.name`, else the network's); added for the kserve
    # dialect, which serves every model under the names its backend describes.
    name: str = "input"

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) a node resizes to; a dynamic dimension is reported as -1."""
        return self.shape[1], self.shape[2]


class CompiledModel(ABC):
    """One loaded version of one store model, with as many `slots` (requests in flight) as it runs best at.

    Thread-safe: worker threads call `infer` at once, up to `slots` of them run in parallel, the rest wait.
    """

    name: str  # the model's store name
    version: str  # the store version's folder name
    spec: ModelSpec  # the version's typed spec (labels, thresholds, outputs per task)
    device: str  # what the profile asked for ("CPU", "AUTO:NPU,GPU,CPU", "kserve http://host:8000")
    execution_devices: list[str]  # where it really runs
    precision: str  # "f32", "f16", ... or "remote"
    slots: int
    load_seconds: float
    input: InputDescription
    outputs: list[TensorDescription]

    @property
    def output_names(self) -> list[str]:
        return [output.name for output in self.outputs]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) frames are brought to; a dynamic dimension keeps the spec's size."""
        height, width = self.spec.input.size
        wanted_h, wanted_w = self.input.size
        return (wanted_h if wanted_h > 0 else height, wanted_w if wanted_w > 0 else width)

    @abstractmethod
    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Blocking inference of an NxHxWx3 u8 BGR batch from a worker thread; outputs by name, owned by the
        caller (never views of a buffer the next request reuses)."""

    def metadata(self) -> dict[str, object]:
        """What a client may read about this version (KServe's model metadata, the console's model page)."""
        return {"name": self.name, "version": self.version, "task": self.spec.task, "device": self.device,
                "execution_devices": list(self.execution_devices), "precision": self.precision,
                "input": list(self.input.shape), "outputs": self.output_names}
