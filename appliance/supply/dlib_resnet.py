"""dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) read without dlib and rebuilt
as an OpenVINO graph.

The file is dlib's ``serialize`` of the ``anet_type`` of dlib's ``examples/dnn_face_recognition_ex.cpp``:
a 150x150 RGB chip -> 128-D descriptor, two faces being the same person when the euclidean distance of their
descriptors is under 0.6 (the loss's ``distance_threshold``, stored in the file). The reader follows dlib's
serialisation (``dlib/serialize.h``, ``dlib/dnn/core.h``, ``layers.h``, ``input.h``, ``loss.h``,
``cuda/tensor.h``), read as documentation; no dlib code is copied:

* integers: one control byte (low nibble = byte count, 0x80 = negative), then the bytes little-endian;
* floats (scalars): a float_details, i.e. mantissa (int64) and exponent (int16) as two such integers;
* bool: the byte ``'1'`` or ``'0'``; string: its length, then the bytes;
* tensor: version 2, n, k, nr, nc, then n*k*nr*nc little-endian float32; alias tensor: version 1 and the shape;
* a network nests outside in: each ``add_layer`` writes its version, then its whole subnetwork, then its own
  layer, so the file holds every layer's header first (outermost first) and every layer's weights after
  (innermost first). ``tag``/``skip`` layers write a version and their subnetwork only.

``ANET`` spells the network outermost first, as the C++ type does, and the reader checks every layer
against it (its version string, kernel, stride and padding); a file of another shape stops with the byte
offset and what was expected. ``face_descriptor_resnet`` then evaluates the chain innermost first:
``tag`` remembers a tensor, ``skip`` goes back to it, ``add_prev`` adds it, zero-padding the smaller one
(channels and the bottom/right border) as dlib's ``tt::add`` does: in the down-sampling blocks at 8x8 and
4x4 the 3x3/stride 2 convolution (no padding) gives 3x3 and 1x1 while the 2x2 average pool gives 4x4 and 2x2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.preprocess import ColorFormat, PrePostProcessor

INPUT_NAME = "input"
CHIP_SIZE = 150
OUTPUT_NAME = "descriptor"

# One entry per layer of the chain, outermost first: (kind, parameters).
Entry = tuple[str, tuple[int, ...]]


def _block(filters: int, stride: int) -> list[Entry]:
    # block<N,affine,stride> = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,SUBNET>>>>>
    return [("affine", ()), ("con", (filters, 3, 3, 1, 1)), ("relu", ()), ("affine", ()),
            ("con", (filters, 3, 3, stride, stride))]


def _ares(filters: int) -> list[Entry]:
    # ares<N> = relu<add_prev1<block<N,1,tag1<SUBNET>>>>
    return [("relu", ()), ("add_prev", (1,)), *_block(filters, 1), ("tag", (1,))]


def _ares_down(filters: int) -> list[Entry]:
    # ares_down<N> = relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<SUBNET>>>>>>>
    return [("relu", ()), ("add_prev", (2,)), ("avg_pool", (2, 2, 2, 2)), ("skip", (1,)), ("tag", (2,)),
            *_block(filters, 2), ("tag", (1,))]


ANET: tuple[Entry, ...] = (
    ("loss_metric", ()),
    ("fc", (128,)),  # fc_no_bias
    ("avg_pool", (0, 0, 1, 1)),  # avg_pool_everything
    *_ares_down(256),  # alevel0
    *_ares(256), *_ares(256), *_ares_down(256),  # alevel1
    *_ares(128), *_ares(128), *_ares_down(128),  # alevel2
    *_ares(64), *_ares(64), *_ares(64), *_ares_down(64),  # alevel3
    *_ares(32), *_ares(32), *_ares(32),  # alevel4
    ("max_pool", (3, 3, 2, 2)), ("relu", ()), ("affine", ()), ("con", (32, 7, 7, 2, 2)),
    ("input", (CHIP_SIZE, CHIP_SIZE)),  # input_rgb_image_sized<150>
)


class DlibFormatError(ValueError):
    """The bytes are not the dlib network this module knows; the message names the offset and the expectation."""


@dataclass
class Layer:
    """One layer of the chain with what the file says about it (weights as float32 arrays)."""

    kind: str
    params: tuple[int, ...]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, float | int | bool | str] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.at = 0

    def fail(self, message: str) -> DlibFormatError:
        return DlibFormatError(f"dlib network file, byte {self.at}: {message}")

    def _take(self, count: int) -> memoryview:
        if self.at + count > len(self.data):
            raise self.fail(f"file ends while {count} more bytes are needed")
        chunk = self.data[self.at:self.at + count]
        self.at += count
        return chunk

    def integer(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self.fail(f"control byte {control:#04x} does not start an integer")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def real(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        if exponent in (32000, 32001, 32002):  # float_details' inf, -inf, nan
            return {32000: float("inf"), 32001: float("-inf"), 32002: float("nan")}[exponent]
        return float(np.ldexp(np.float64(mantissa), exponent))

    def boolean(self) -> bool:
        byte = bytes(self._take(1))
        if byte not in (b"0", b"1"):
            raise self.fail(f"expected a bool ('0' or '1'), found {byte!r}")
        return byte == b"1"

    def string(self) -> str:
        length = self.integer()
        if not 0 <= length <= 256:
            raise self.fail(f"string of length {length}: not a layer name")
        return bytes(self._take(length)).decode("ascii", "replace")

    def version(self, what: str, allowed: tuple[int, ...]) -> int:
        version = self.integer()
        if version not in allowed:
            raise self.fail(f"{what}: version {version}, expected {' or '.join(map(str, allowed))}")
        return version

    def name(self, allowed: tuple[str, ...]) -> str:
        start = self.at
        name = self.string()
        if name not in allowed:
            self.at = start
            raise self.fail(f"found layer '{name}', expected {' or '.join(allowed)}")
        return name

    def tensor(self) -> np.ndarray:
        self.version("tensor", (2,))
        shape = tuple(self.integer() for _ in range(4))
        if any(n < 0 for n in shape):
            raise self.fail(f"tensor of shape {shape}")
        count = int(np.prod(shape))
        return np.frombuffer(self._take(4 * count), dtype="<f4").reshape(shape).astype(np.float32)

    def alias_shape(self) -> tuple[int, ...]:
        self.version("alias tensor", (1,))
        return tuple(self.integer() for _ in range(4))


def _split(params: np.ndarray, shapes: list[tuple[int, ...]], reader: _Reader, what: str) -> list[np.ndarray]:
    flat = params.reshape(-1)
    sizes = [int(np.prod(shape)) for shape in shapes]
    if sum(sizes) != flat.size:
        raise reader.fail(f"{what}: {flat.size} parameters, but its parts {shapes} need {sum(sizes)}")
    parts, offset = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        parts.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return parts


def _read_layer(reader: _Reader, layer: Layer) -> None:
    """The layer's own part (dlib's ``serialize(details)``), checked against ``layer.params``."""
    kind, params = layer.kind, layer.params
    if kind == "con":
        version = reader.name(("con_4", "con_5", "con_6"))
        all_params = reader.tensor()
        filters = reader.integer()
        geometry = tuple(reader.integer() for _ in range(6))  # nr, nc, stride y, stride x, padding y, padding x
        wanted_filters, rows, columns, stride_y, stride_x = params
        padding = (0 if stride_y != 1 else rows // 2, 0 if stride_x != 1 else columns // 2)
        if (filters, *geometry) != (wanted_filters, rows, columns, stride_y, stride_x, *padding):
            raise reader.fail(f"con with {filters} filters, geometry {geometry}; expected {wanted_filters} "
                              f"filters, {rows}x{columns}, stride {stride_y}x{stride_x}, padding {padding}")
        weight_shape, bias_shape = reader.alias_shape(), reader.alias_shape()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.real()
        use_bias = reader.boolean() if version in ("con_5", "con_6") else True
        if version == "con_6" and reader.boolean():
            raise reader.fail("con with a fused relu: not in this network")
        shapes = [weight_shape] + ([bias_shape] if use_bias else [])
        parts = _split(all_params, shapes, reader, "con")
        layer.arrays["weight"] = parts[0]
        layer.arrays["bias"] = parts[1].reshape(-1) if use_bias else np.zeros(filters, np.float32)
    elif kind == "affine":
        version = reader.name(("affine_", "affine_2", "bn_con2"))
        if version == "bn_con2":
            # A batch norm stored as such: dlib turns it into gamma / sqrt(var + eps), beta - mean * that.
            all_params = reader.tensor()
            gamma_shape, beta_shape = reader.alias_shape(), reader.alias_shape()
            reader.tensor(), reader.tensor()  # means, invstds of the last batch
            running_means, running_variances = reader.tensor().reshape(-1), reader.tensor().reshape(-1)
            reader.integer(), reader.integer()  # num_updates, running_stats_window_size
            for _ in range(4):
                reader.real()
            eps = reader.real()
            gamma, beta = (p.reshape(-1) for p in _split(all_params, [gamma_shape, beta_shape], reader, "bn"))
            scale = gamma / np.sqrt(running_variances + eps)
            layer.arrays["gamma"], layer.arrays["beta"] = scale, beta - scale * running_means
        else:
            all_params = reader.tensor()
            gamma_shape, beta_shape = reader.alias_shape(), reader.alias_shape()
            mode = reader.integer()
            disabled = reader.boolean() if version == "affine_2" else False
            if mode != 0:
                raise reader.fail(f"affine in mode {mode}, expected 0 (per channel, after a convolution)")
            gamma, beta = (p.reshape(-1) for p in _split(all_params, [gamma_shape, beta_shape], reader, "affine"))
            if disabled:
                gamma, beta = np.ones_like(gamma), np.zeros_like(beta)
            layer.arrays["gamma"], layer.arrays["beta"] = gamma, beta
    elif kind == "relu":
        if reader.name(("relu_", "relu_2")) == "relu_2" and reader.boolean():
            raise reader.fail("disabled relu: not in this network")
    elif kind == "add_prev":
        reader.name(("add_prev_",))
    elif kind in ("max_pool", "avg_pool"):
        reader.name((f"{kind}_2",))
        geometry = tuple(reader.integer() for _ in range(6))
        rows, columns, stride_y, stride_x = params
        padding = (0 if stride_y != 1 else rows // 2, 0 if stride_x != 1 else columns // 2)
        if geometry != (*params, *padding):
            raise reader.fail(f"{kind} with geometry {geometry}, expected {(*params, *padding)}")
    elif kind == "fc":
        version = reader.name(("fc_2", "fc_3"))
        outputs, inputs = reader.integer(), reader.integer()
        all_params = reader.tensor()
        weight_shape, _bias_shape = reader.alias_shape(), reader.alias_shape()
        bias_mode = reader.integer()
        for _ in range(4):
            reader.real()
        if version == "fc_3":
            reader.boolean()  # use_bias: a no-bias fc has no bias to use
        if outputs != params[0] or bias_mode != 1:
            raise reader.fail(f"fc with {outputs} outputs and bias mode {bias_mode}; expected {params[0]} "
                              f"outputs without bias (fc_no_bias)")
        layer.arrays["weight"] = _split(all_params, [weight_shape], reader, "fc")[0].reshape(inputs, outputs)
    else:
        raise reader.fail(f"no reader for layer kind '{kind}'")


def read_network(data: bytes, architecture: tuple[Entry, ...] = ANET) -> list[Layer]:
    """The layers of a dlib network file, innermost (next to the input) first; checked against ``architecture``.

    Raises ``DlibFormatError`` (with the byte offset) when the file is of another shape or is cut short.
    """
    reader = _Reader(data)
    (loss_kind, _), *chain, (input_kind, input_size) = architecture
    if loss_kind != "loss_metric" or input_kind != "input":
        raise ValueError("architecture must start with loss_metric and end with input")
    reader.version("add_loss_layer", (1,))
    loss = Layer("loss_metric", ())
    if reader.name(("loss_metric_", "loss_metric_2")) == "loss_metric_2":
        loss.values["margin"], loss.values["distance_threshold"] = reader.real(), reader.real()
    else:
        loss.values["margin"], loss.values["distance_threshold"] = 0.1, 0.75
    layers = [Layer(kind, params) for kind, params in chain]
    versions = []
    for layer in layers:  # headers, outermost first
        is_tag = layer.kind in ("tag", "skip")
        versions.append(reader.version(f"{layer.kind} layer", (1,) if is_tag else (1, 2, 3)))
    innermost = layers[-1]
    if innermost.kind in ("tag", "skip"):
        raise ValueError("the layer on the input must be a computational layer")
    reader.name(("input_rgb_image_sized",))
    image = Layer("input", input_size)
    image.arrays["mean_rgb"] = np.array([reader.real() for _ in range(3)], np.float32)
    size = (reader.integer(), reader.integer())
    if size != input_size:
        raise reader.fail(f"input of {size[0]}x{size[1]}, expected {input_size[0]}x{input_size[1]}")
    for index in range(len(layers) - 1, -1, -1):  # the layers' own parts, innermost first
        layer, version = layers[index], versions[index]
        if layer.kind in ("tag", "skip"):
            continue
        _read_layer(reader, layer)
        for _ in range(3):  # setup called, gradient stale, output and gradient disabled
            reader.boolean()
        reader.tensor(), reader.tensor()  # x_grad, cached_output
        if index == len(layers) - 1:
            reader.tensor()  # grad_final
            if version >= 3:
                reader.integer()  # sample expansion factor
        elif version >= 2:
            reader.tensor()  # params_grad
    if reader.at != len(reader.data):
        raise reader.fail(f"{len(reader.data) - reader.at} bytes left after the last layer")
    return [image, *reversed(layers), loss]


def load_face_resnet(data: bytes) -> dict[str, np.ndarray]:
    """The weights of ``dlib_face_recognition_resnet_model_v1.dat`` as a flat dict, ``layers.<i>.<kind>.<array>``
    with ``i`` counted from the input (as ``backbones``' builders take a state dict), plus ``loss.<value>``."""
    state: dict[str, np.ndarray] = {}
    for index, layer in enumerate(read_network(data)):
        for key, array in layer.arrays.items():
            state[f"layers.{index}.{layer.kind}.{key}"] = array
        for key, value in layer.values.items():
            state[f"loss.{key}"] = np.asarray(value, dtype=np.float32)
    return state


def _pad_to(x: ov.Output, shape: list[int]) -> ov.Output:
    current = [int(d) for d in x.get_partial_shape().to_shape()]
    extra = [wanted - have for wanted, have in zip(shape, current, strict=True)]
    if not any(extra):
        return x
    return ops.pad(x, ops.constant(np.zeros(4, np.int64)), ops.constant(np.array(extra, np.int64)),
                   "constant", ops.constant(np.float32(0))).output(0)


def face_descriptor_resnet(state: dict[str, np.ndarray], architecture: tuple[Entry, ...] = ANET) -> ov.Model:
    """dlib's face recognition ResNet as an OpenVINO model, from ``load_face_resnet``'s dict.

    Input ``input``: u8 1x150x150x3, NHWC, **BGR** (a face chip aligned as dlib's ``get_face_chip_details(shape,
    150, 0.25)`` does); the graph does BGR->RGB and ``(x - mean_rgb) / 256`` as dlib's ``input_rgb_image_sized``.
    Output ``descriptor``: 1x128 f32 (not normalised; dlib compares with the euclidean distance, 0.6).
    """
    (_, _), *chain, (_, input_size) = architecture
    used: set[str] = set()

    def weight(index: int, kind: str, key: str) -> np.ndarray:
        name = f"layers.{index}.{kind}.{key}"
        if name not in state:
            raise KeyError(f"face resnet: no '{name}' in the weights ({len(state)} arrays)")
        used.add(name)
        return np.asarray(state[name], np.float32)

    parameter = ops.parameter([1, 3, *input_size], ov.Type.f32, name=INPUT_NAME)
    parameter.output(0).get_tensor().set_names({INPUT_NAME})
    x: ov.Output = parameter.output(0)
    tagged: dict[int, ov.Output] = {}
    for index, (kind, params) in enumerate(reversed(chain), start=1):
        if kind == "con":
            filters, rows, columns, stride_y, stride_x = params
            pads = [0 if stride_y != 1 else rows // 2, 0 if stride_x != 1 else columns // 2]
            y = ops.convolution(x, ops.constant(weight(index, kind, "weight")), [stride_y, stride_x], pads, pads,
                                [1, 1])
            x = ops.add(y, ops.constant(weight(index, kind, "bias").reshape(1, -1, 1, 1))).output(0)
        elif kind == "affine":
            gamma, beta = weight(index, kind, "gamma"), weight(index, kind, "beta")
            x = ops.add(ops.multiply(x, ops.constant(gamma.reshape(1, -1, 1, 1))),
                        ops.constant(beta.reshape(1, -1, 1, 1))).output(0)
        elif kind == "relu":
            x = ops.relu(x).output(0)
        elif kind == "max_pool":
            rows, columns, stride_y, stride_x = params
            x = ops.max_pool(x, [stride_y, stride_x], [1, 1], [0, 0], [0, 0], [rows, columns]).output(0)
        elif kind == "avg_pool" and params[0] == 0:
            x = ops.reduce_mean(x, ops.constant(np.array([2, 3], np.int64)), False).output(0)
        elif kind == "avg_pool":
            rows, columns, stride_y, stride_x = params
            x = ops.avg_pool(x, [stride_y, stride_x], [0, 0], [0, 0], [rows, columns], True).output(0)
        elif kind == "tag":
            tagged[params[0]] = x
        elif kind == "skip":
            x = tagged[params[0]]
        elif kind == "add_prev":
            other = tagged[params[0]]
            shape = [max(int(a), int(b)) for a, b in zip(x.get_partial_shape().to_shape(),
                                                           other.get_partial_shape().to_shape(), strict=True)]
            x = ops.add(_pad_to(x, shape), _pad_to(other, shape)).output(0)
        elif kind == "fc":
            x = ops.matmul(x, ops.constant(weight(index, kind, "weight")), False, False).output(0)
        else:
            raise ValueError(f"face resnet: no graph for layer kind '{kind}'")
    x.get_tensor().set_names({OUTPUT_NAME})
    x.get_node().set_friendly_name(OUTPUT_NAME)
    unused = {k for k in state if k.startswith("layers.") and k not in used and k != "layers.0.input.mean_rgb"}
    if unused:
        raise ValueError(f"face resnet: {len(unused)} weights not used by the graph, e.g. {sorted(unused)[:5]}")
    model = ov.Model([ops.result(x)], [parameter], "dlib_face_recognition_resnet_model_v1")
    mean = [float(v) for v in state["layers.0.input.mean_rgb"]]
    ppp = PrePostProcessor(model)
    tensor = ppp.input(INPUT_NAME)
    tensor.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
    tensor.model().set_layout(ov.Layout("NCHW"))
    tensor.preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).mean(mean).scale(256.0)
    return ppp.build()
