"""The Open Inference Protocol's tensors over HTTP: an inference request (a JSON body, or the binary tensor
extension: a JSON header of `Inference-Header-Content-Length` bytes followed by the tensors' bytes) checked
against the model's one input as the appliance compiled it, and the answer (outputs as JSON or as binary data).

Pure functions of bytes and arrays, run in a worker thread: a JSON body of a 224x224 frame is 150,528 numbers
(about 15 ms to parse here), never parsed on the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.errors import ApplianceError, BadRequest
from appliance.runtime.compiled import DATATYPES, HEADER_LENGTH, datatype_of, json_header_length, shape_text


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the compiled model has it; -1 for a dimension that takes any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request: the input batch, the outputs wanted (name -> as binary data), its id."""

    batch: np.ndarray
    outputs: dict[str, bool] | None  # None: every output, each as binary data when `binary_all`
    binary_all: bool
    request_id: str | None


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON header's length from `Inference-Header-Content-Length` (None when the header is absent)."""
    try:
        return json_header_length(value, body_size)
    except ValueError as error:
        raise BadRequest(str(error)) from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return value


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    return _object(entry.get("parameters", {}), f"{where}.parameters")


def _flag(parameters: dict[str, Any], name: str, where: str) -> bool | None:
    value = parameters.get(name)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{where}.parameters.{name} must be true or false, got {json.dumps(value)[:40]}")
    return value


def _request_shape(entry: dict[str, Any], where: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise BadRequest(f"{where}.shape must be a list of sizes (integers >= 0), got {json.dumps(shape)[:80]}")
    return tuple(shape)


def _check_shape(name: str, shape: tuple[int, ...], expected: TensorSpec) -> None:
    fits = len(shape) == len(expected.shape) and all(want in (-1, got) for want, got in zip(expected.shape, shape,
                                                                                            strict=True))
    if not fits or 0 in shape:
        height, width = expected.shape[1:3] if len(expected.shape) == 4 else (-1, -1)
        hint = (f"; send the frame resized to {width}x{height} (width x height), u8 BGR, NHWC"
                if height > 0 and width > 0 else "; u8 BGR frames, NHWC")
        raise BadRequest(f"input '{name}': shape {shape_text(shape)} does not fit the model's "
                         f"{shape_text(expected.shape)}{hint}")


def _json_data(name: str, data: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The `data` of a JSON input (flat in row-major order, or nested) as an array of ``shape``."""
    if not isinstance(data, list):
        raise BadRequest(f"input '{name}' has no data: give `data` (a list of numbers in row-major order) or "
                         "send it as binary data (parameters.binary_data_size)")
    try:
        values = np.asarray(data)
    except ValueError:
        raise BadRequest(f"input '{name}': data is not a list of numbers (nested lists of unequal length?)") from None
    count = int(np.prod(shape))
    if values.size != count:
        raise BadRequest(f"input '{name}': data has {values.size} values; shape {shape_text(shape)} needs {count}")
    if dtype.kind in "iu":
        if values.size and values.dtype.kind not in "iu":
            raise BadRequest(f"input '{name}': {datatype_of(dtype)} data must be integers")
        limits = np.iinfo(dtype)
        if values.size and (values.min() < limits.min or values.max() > limits.max):
            raise BadRequest(f"input '{name}': {datatype_of(dtype)} data must be integers from {limits.min} to "
                             f"{limits.max}")
    return values.astype(dtype, copy=False).reshape(shape)


def parse_request(body: bytes | bytearray, header_size: int | None, model: str, expected: TensorSpec,
                  outputs: list[str]) -> InferRequest:
    """Check an inference request against the model's input (``expected``) and outputs; raises BadRequest
    saying what is wrong and what is expected."""
    view = memoryview(body)
    header = view if header_size is None else view[:header_size]
    if not len(header):
        raise BadRequest('the inference request is empty; send a JSON object {"inputs": [...]}')
    try:
        request = json.loads(bytes(header))
    except ValueError as error:
        where = "body" if header_size is None else f"header ({HEADER_LENGTH}: {header_size})"
        raise BadRequest(f"the inference request's {where} is not JSON: {error}") from None
    request = _object(request, "the inference request")
    binary_all = bool(_flag(_parameters(request, "request"), "binary_data_output", "request"))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id must be a string")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(f"inputs must be a non-empty list; model '{model}' takes one input, '{expected.name}' "
                         f"({expected.datatype} {shape_text(expected.shape)}: u8 BGR frames, NHWC)")
    binary = view[header_size:] if header_size is not None else view[:0]
    binary_used = 0
    batch: np.ndarray | None = None
    for position, entry in enumerate(inputs):
        where = f"inputs[{position}]"
        entry = _object(entry, where)
        name = entry.get("name")
        if name != expected.name:
            raise BadRequest(f"model '{model}' has no input {json.dumps(name)[:80]}; its input is '{expected.name}' "
                             f"({expected.datatype} {shape_text(expected.shape)}: u8 BGR frames, NHWC)")
        if batch is not None:
            raise BadRequest(f"input '{name}' is given twice")
        datatype = entry.get("datatype")
        if datatype != expected.datatype:
            raise BadRequest(f"input '{name}': datatype {json.dumps(datatype)[:40]} is not the model's "
                             f"{expected.datatype} (u8 BGR frames, as the flow's nodes give them)")
        shape = _request_shape(entry, where)
        _check_shape(name, shape, expected)
        dtype = DATATYPES[expected.datatype]
        size = _parameters(entry, where).get("binary_data_size")
        if size is None:
            batch = _json_data(name, entry.get("data"), shape, dtype)
            continue
        if header_size is None:
            raise BadRequest(f"input '{name}' has parameters.binary_data_size but the request has no {HEADER_LENGTH} "
                             "header saying where its JSON ends")
        needed = int(np.prod(shape)) * dtype.itemsize
        if not isinstance(size, int) or isinstance(size, bool) or size != needed:
            raise BadRequest(f"input '{name}': binary_data_size {json.dumps(size)[:40]}; shape {shape_text(shape)} "
                             f"of {expected.datatype} is {needed} bytes")
        if binary_used + size > len(binary):
            raise BadRequest(f"input '{name}': {size} bytes of binary data announced, {len(binary) - binary_used} "
                             "left in the body after the JSON header")
        batch = np.frombuffer(binary[binary_used:binary_used + size], dtype=dtype.newbyteorder("<")).reshape(shape)
        binary_used += size
    if binary_used != len(binary):
        raise BadRequest(f"the body has {len(binary)} bytes after the JSON header; the inputs' binary_data_size add "
                         f"up to {binary_used}")
    assert batch is not None
    return InferRequest(batch, _requested_outputs(request, model, outputs, binary_all), binary_all, request_id)


def _requested_outputs(request: dict[str, Any], model: str, outputs: list[str], binary_all: bool
                       ) -> dict[str, bool] | None:
    wanted = request.get("outputs")
    if wanted is None:
        return None
    if not isinstance(wanted, list):
        raise BadRequest("outputs must be a list of {\"name\": ...}")
    chosen: dict[str, bool] = {}
    for position, entry in enumerate(wanted):
        where = f"outputs[{position}]"
        entry = _object(entry, where)
        name = entry.get("name")
        if name not in outputs:
            raise BadRequest(f"model '{model}' has no output {json.dumps(name)[:80]}; outputs: {', '.join(outputs)}")
        binary = _flag(_parameters(entry, where), "binary_data", where)
        chosen[name] = binary_all if binary is None else binary
    return chosen


def render_response(model: str, version: str, request: InferRequest, results: dict[str, np.ndarray]
                    ) -> tuple[bytes, dict[str, str], str]:
    """The answer's body, headers and content type: JSON, or the JSON header then each binary output's bytes in
    the order of `outputs`."""
    chosen = request.outputs if request.outputs is not None else dict.fromkeys(results, request.binary_all)
    answer: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.request_id is not None:
        answer["id"] = request.request_id
    entries = []
    blobs: list[bytes] = []
    for name, binary in chosen.items():
        array = results[name]
        datatype = datatype_of(array.dtype)
        if datatype is None:
            raise ApplianceError(f"output '{name}' is {array.dtype}, which the protocol has no datatype for",
                                 status=500)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    answer["outputs"] = entries
    header = json.dumps(answer, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return header, {}, "application/json"
    return b"".join([header, *blobs]), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"
