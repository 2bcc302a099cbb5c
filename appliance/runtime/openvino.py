"""The OpenVINO backend of `CompiledModel`: a store version compiled in this process, with its pool of requests.

The graph takes what frames are: u8 BGR NHWC. Colour order, element type, scaling, layout and (on devices that
take dynamic shapes) the resize to the network's size run inside it, in OpenVINO's PrePostProcessor, so a node
hands a camera frame as it is (`input.any_size`). The profile decides the device quirks through RuntimeOptions:
`static_shapes` (the NPU: every dimension fixed, no resize in the graph; the node resizes) and `performance`
(the PERFORMANCE_HINT where the profile's properties do not set one). Segmentation models get their per-pixel
best class and its probability appended to the graph (`segment_outputs`), so no C x H x W map reaches Python.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.preprocess import ColorFormat, PrePostProcessor, ResizeAlgorithm

from appliance.runtime.compiled import (
    ELEMENT_DATATYPES,
    CompiledModel,
    InputDescription,
    InputShape,
    TensorDescription,
)
from appliance.runtime.devices import core
from appliance.runtime.spec import ModelSpec, SegmentSpec, read_spec
from appliance.runtime.store import StoreError, network_file

if TYPE_CHECKING:
    from appliance.runtime.models import RuntimeObserver, RuntimeOptions


# Names of the outputs appended to a segmentation network: the best class per pixel (i32) and its probability.
SEGMENT_CLASS = "appliance:class"
SEGMENT_PROBABILITY = "appliance:probability"


@dataclass(frozen=True)
class SegmentOutputs:
    """What `segment_outputs` appends: the per-pixel best class and its probability, after `activation`
    (softmax over the classes, a sigmoid for one class, none for probabilities)."""

    activation: str  # "softmax" | "sigmoid" | "none"


def _segment_activation(spec: SegmentSpec, output: ov.Output) -> str | None:
    """The activation that turns this segmentation output into probabilities, as the spec's `activation` names it;
    None for class ids (integers) or a spec that does not say (the node decides per frame)."""
    if output.get_element_type().is_integral():
        return None
    return spec.activation


def append_segment_outputs(model: ov.Model, activation: str) -> None:
    """Append to a 1 x C x H x W segmentation output the best class per pixel and its probability (TopK over C,
    in the graph: the node then reads two H x W maps instead of C of them and never runs argmax in numpy)."""
    # What feeds the Result (a Model's `outputs` are the Results' own ports, which nothing may read from).
    output = model.get_results()[0].input_value(0)
    values = output
    if activation == "softmax":
        values = ops.softmax(output, 1).output(0)
    elif activation == "sigmoid":
        values = ops.sigmoid(output).output(0)
    top = ops.topk(values, ops.constant(np.int64(1)), axis=1, mode="max", sort="value",
                   index_element_type=ov.Type.i32)
    probability, best = top.output(0), top.output(1)
    results = [ops.result(probability), ops.result(best)]
    results[0].output(0).get_tensor().set_names({SEGMENT_PROBABILITY})
    results[1].output(0).get_tensor().set_names({SEGMENT_CLASS})
    model.add_results(results)


def adapt_input(model: ov.Model, spec: ModelSpec, input_shape: InputShape | None, resize_in_graph: bool) -> ov.Model:
    """Make the network take u8 NHWC BGR frames: at its own size (static), at ``input_shape`` (-1: dynamic), or,
    with ``resize_in_graph``, at any height and width, resized (linear) to its size inside the graph."""
    batch, height, width = input_shape or (1, *spec.input.size)
    layout = spec.input.layout
    shape = [batch, height, width, 3] if layout == "NHWC" else [batch, 3, height, width]
    model.reshape({model.inputs[0].get_any_name(): shape} if model.inputs[0].get_names() else {0: shape})
    wanted = spec.input
    converts = not (wanted.element_type == "u8" and layout == "NHWC" and wanted.colour_order == "BGR")
    if not converts and not resize_in_graph:
        return model
    ppp = PrePostProcessor(model)
    tensor = ppp.input().tensor()
    tensor.set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
    if resize_in_graph:
        tensor.set_spatial_dynamic_shape()
    ppp.input().model().set_layout(ov.Layout(layout))
    steps = ppp.input().preprocess()
    if resize_in_graph:
        # On u8, before any conversion: a quarter of the bytes an f32 resize would move.
        steps.resize(ResizeAlgorithm.RESIZE_LINEAR)
    if wanted.colour_order == "RGB":
        steps.convert_color(ColorFormat.RGB)
    steps.convert_element_type(ov.Type.f32 if wanted.element_type == "f32" else ov.Type.u8)
    if wanted.element_type == "f32":
        if wanted.scale != 1.0:
            steps.scale(1.0 / wanted.scale)
        if wanted.mean is not None:
            steps.mean(list(wanted.mean))
        if wanted.std is not None:
            steps.scale(list(wanted.std))
    return ppp.build()


def takes_precision_hint(device: str) -> bool:
    """Whether ``device`` lists INFERENCE_PRECISION_HINT (the NPU does not); AUTO and HETERO pass it on."""
    try:
        supported = core().get_property(device.split(":")[0].split(".")[0], "SUPPORTED_PROPERTIES")
    except RuntimeError:
        return True
    return device.startswith(("AUTO", "HETERO", "MULTI")) or "INFERENCE_PRECISION_HINT" in supported


def compile_reason(error: RuntimeError) -> str:
    """OpenVINO's messages run over many lines, led by source locations ("Exception from src/...:84:", "Check
    '...' failed at ..."); the last line says what is wrong (RELIABILITY 11.3)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()
             and not line.startswith("Exception from ") and " failed at src/" not in line]
    return (lines[-1] if lines else "unknown error")[:300]


def network_info(version_dir: Path, *path: str) -> str | None:
    """A text the network carries in its runtime info (an ONNX export's `metadata_props`, e.g. PaddleOCR's
    alphabet at framework/character), or None."""
    model = core().read_model(str(network_file(version_dir)))
    return str(model.get_rt_info(list(path)).astype(str)) if model.has_rt_info(list(path)) else None


def _description(port: ov.Output, name: str) -> TensorDescription:
    shape = tuple(dimension.get_length() if dimension.is_static else -1 for dimension in port.get_partial_shape())
    element = port.get_element_type().get_type_name()
    return TensorDescription(name, ELEMENT_DATATYPES.get(element, element.upper()), shape)


class OpenVinoModel(CompiledModel):
    """One version compiled on the profile's device, with as many infer requests as the device runs best at."""

    def __init__(self, name: str, version_dir: Path, options: RuntimeOptions,
                 observer: RuntimeObserver | None = None, input_shape: InputShape | None = None):
        started = time.perf_counter()
        self.observer = None  # the warm-up inference is not a served one
        self.name = name
        self.version = version_dir.name
        self.spec = read_spec(version_dir)
        self.device = options.device
        config: dict[str, Any] = dict(options.properties)
        if options.performance is not None:
            config.setdefault("PERFORMANCE_HINT", options.performance.upper())
        if self.spec.precision is not None and takes_precision_hint(options.device):
            # The model's need wins over the profile's choice (and over a node's device, which has no properties).
            config["INFERENCE_PRECISION_HINT"] = self.spec.precision
        if options.cache_dir is not None:
            config["CACHE_DIR"] = str(options.cache_dir)
        if options.static_shapes and input_shape is not None and -1 in input_shape:
            raise StoreError(f"model '{name}' version {self.version}: input shape {list(input_shape)} has dynamic "
                             f"dimensions, which {options.device} (static_shapes in the profile) cannot run")
        # A resize in the graph needs a dynamic height and width: not on static-shape devices, and not where the
        # node asked for its own (dynamic) sizes.
        resize_in_graph = options.resize_in_graph and not options.static_shapes \
            and (input_shape is None or -1 not in input_shape)
        self.segment_outputs: SegmentOutputs | None = None
        try:
            network = core().read_model(str(network_file(version_dir)))
            if isinstance(self.spec, SegmentSpec) and len(network.outputs) == 1 \
                    and network.outputs[0].get_partial_shape().rank.get_length() == 4:
                activation = _segment_activation(self.spec, network.outputs[0])
                if activation is not None:
                    append_segment_outputs(network, activation)
                    self.segment_outputs = SegmentOutputs(activation)
            network = adapt_input(network, self.spec, input_shape, resize_in_graph)
            self.compiled = core().compile_model(network, options.device, config)
        except RuntimeError as error:
            raise StoreError(f"model '{name}' version {self.version}: cannot compile on {options.device}: "
                             f"{compile_reason(error)}") from None
        ports = list(self.compiled.outputs)
        self.outputs = [_description(port, port.get_any_name()) for port in ports]
        given = _description(self.compiled.inputs[0], self.compiled.inputs[0].get_any_name())
        batch, in_h, in_w, channels = given.shape
        self.input = InputDescription((batch, in_h, in_w, channels), any_size=resize_in_graph,
                                      name=self.spec.input.name or given.name)
        self.slots = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._idle: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
        for _ in range(self.slots):
            self._idle.put(self.compiled.create_infer_request())
        try:
            hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        except RuntimeError:
            self.precision = "unknown"
        try:
            self.execution_devices = list(self.compiled.get_property("EXECUTION_DEVICES"))
        except RuntimeError:
            self.execution_devices = [options.device]
        height, width = self.spec.input.size
        # The shape asked for (the spec's when none): a dynamic dimension keeps the spec's size in input_size.
        self.input_shape: InputShape = input_shape or (1, height, width)
        self.warm_up()
        self.load_seconds = time.perf_counter() - started
        self.observer = observer

    def warm_up(self) -> None:
        height, width = self.input_size
        self.infer(np.zeros((max(1, self.input_shape[0]), height, width, 3), np.uint8))

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Blocking inference; OpenVINO releases the GIL. The batch is read in place when it is contiguous (a
        camera frame of any size goes in without a copy); outputs are copies the caller owns."""
        request = self._idle.get()
        started = time.perf_counter()
        try:
            request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True)
            return {output.name: request.get_output_tensor(index).data.copy()
                    for index, output in enumerate(self.outputs)}
        finally:
            self._idle.put(request)
            if self.observer is not None:
                self.observer.inference(self, time.perf_counter() - started)
