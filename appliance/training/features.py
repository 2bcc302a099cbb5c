"""The feature graph both trainers share: EfficientNet-lite0 taps and local grey statistics on a stride-4 grid.

``patch_features`` turns the pinned backbone (`make models`: efficientnet_lite0) into patch features of a u8 BGR
frame: the taps ``blocks.2`` (24 ch, stride 4) and ``blocks.4`` (40 ch, stride 8), each 3x3 average-pooled,
``blocks.4`` bilinearly upsampled to the stride-4 grid (64x64 for 256x256): 64 channels; then the mean and
standard deviation of the grey frame over 16x16 px on the same grid. The anomaly model (anomaly.py) scores them
against a memory bank, the surface segmenter (segment.py) classifies them; both graphs start with this one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops  # as supply/backbones.py; every op used here is in opset 13

from appliance.paths import model_store
from appliance.runtime.devices import core
from appliance.runtime.store import read_current
from appliance.training import TrainingError

BACKBONE = "efficientnet_lite0"
# The input tensor of the trained graphs, as the stored backbones name theirs (supply/backbones.py) and as
# anomalib's OpenVINO exports do.
INPUT_NAME = "input"
TAPS = ("blocks.2", "blocks.4")
GRID_STRIDE = 4  # blocks.2's stride: the map is size / 4 on a side
POOL = 3
# Lever measured in bench/anomaly_quality.py (docs/anomaly.md): the frame is mirrored 8 px on every side before
# the backbone and the features cropped back. Without it, 28 of 30 held-out good gravel and grass crops had their
# map maximum on the outermost pixel row or column: zero padding makes border patches that the interior never
# has, and they are too few in the bank to be covered. Mean image AUROC 0.819 -> 0.852 and pixel 0.900 -> 0.913
# over 4 textures x 2 seeds (gravel 0.67 -> 0.80), for +0.7 ms (16 px: 0.856, +1.3 ms).
BORDER_PAD = 8
# MODELS.md 5: 32 px at double weight lost foreign patches on brick. Adding an 8 px (or 6 px) pair for the
# thin scratches and small spots was measured here too: 0.819 -> 0.826 / 0.823 mean image AUROC, noise.
INTENSITY_WINDOWS: tuple[int, ...] = (16,)
# The grey of an OpenCV BGR frame, as cv2.cvtColor(..., COLOR_BGR2GRAY) weighs it.
BGR_TO_GREY = np.array([[0.114], [0.587], [0.299]], np.float32)
FEATURE_CHANNELS = 24 + 40 + 2 * len(INTENSITY_WINDOWS)


def constant(array: np.ndarray | Sequence[float] | Sequence[int] | float, dtype: type = np.float32) -> ov.Output:
    return ops.constant(np.asarray(array, dtype=dtype)).output(0)


def tensor_names(model: ov.Model) -> list[str]:
    """The named tensors of the graph in execution order (``stem``, ``blocks.0``, ...), input and results left out."""
    names: list[str] = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Parameter", "Result"):
            continue
        for output in op.outputs():
            names.extend(sorted(n for n in output.get_names() if n not in names))
    return names


def feature_extractor(model: ov.Model, taps: list[str], size: tuple[int, int]) -> ov.Model:
    """A copy of ``model`` whose outputs are the named tap tensors, reshaped to ``size`` = (height, width).

    Layers after the deepest tap are dropped (the outputs are only the taps). The input keeps its element
    type, layout and colour order: u8 NHWC BGR for the stored backbones (supply/backbones.py). Unknown tap names raise ``KeyError``
    listing the names the model has.
    """
    if not taps:
        raise ValueError("feature_extractor needs at least one tap name")
    copy = model.clone()
    outputs: dict[str, ov.Output] = {}
    for op in copy.get_ordered_ops():
        if op.get_type_name() == "Result":
            continue
        for output in op.outputs():
            for name in output.get_names():
                outputs.setdefault(name, output)
    missing = [t for t in taps if t not in outputs]
    if missing:
        known = ", ".join(tensor_names(copy))
        raise KeyError(f"unknown tap {', '.join(missing)}; known: {known}")
    results = []
    for tap in taps:
        result = ops.result(outputs[tap])
        result.set_friendly_name(f"{tap}/result")
        results.append(result)
    extractor = ov.Model(results, copy.get_parameters(), f"{model.get_friendly_name()}_features")
    height, width = size
    parameter = extractor.get_parameters()[0]
    layout = ov.layout_helpers.get_layout(parameter.output(0))
    shape = list(parameter.get_partial_shape().to_shape())
    shape[ov.layout_helpers.height_idx(layout)] = height
    shape[ov.layout_helpers.width_idx(layout)] = width
    extractor.reshape({parameter.output(0): ov.PartialShape(shape)})
    return extractor


def deep_taps(extractor: ov.Model, grid: int) -> ov.Output:
    """The extractor's two taps (fine at stride 4, coarse at stride 8) pooled POOL x POOL and the coarse one brought
    up to the fine one's ``grid``, side by side: 1 x 64 x grid x grid."""
    fine, coarse = (result.input_value(0) for result in extractor.get_results())

    def pooled(x: ov.Output) -> ov.Output:
        # exclude_pad: border patches are averaged over what exists, not shrunk towards zero.
        return ops.avg_pool(x, [1, 1], [POOL // 2] * 2, [POOL // 2] * 2, [POOL, POOL], True).output(0)

    coarse_up = ops.interpolate(pooled(coarse), constant([grid, grid], np.int64), "linear_onnx", "sizes",
                                coordinate_transformation_mode="half_pixel", axes=constant([2, 3], np.int64))
    return ops.concat([pooled(fine), coarse_up.output(0)], 1).output(0)


def grey_statistics(frame: ov.Output, windows_px: Iterable[int]) -> list[ov.Output]:
    """The grey mean and standard deviation of an f32 NHWC BGR ``frame`` in windows of each size, every
    GRID_STRIDE px (on the taps' grid): two 1 x 1 x G x G maps per window, 0-255 scale."""
    grey = ops.matmul(frame, constant(BGR_TO_GREY), False, False)
    grey = ops.transpose(grey, constant([0, 3, 1, 2], np.int64))
    grey_square = ops.multiply(grey, grey)
    statistics = []
    for size_px in windows_px:
        pad = (size_px - GRID_STRIDE) // 2
        window = ([GRID_STRIDE] * 2, [pad] * 2, [size_px - GRID_STRIDE - pad] * 2, [size_px] * 2)
        mean = ops.avg_pool(grey, *window, True)
        mean_square = ops.avg_pool(grey_square, *window, True)
        variance = ops.maximum(ops.subtract(mean_square, ops.multiply(mean, mean)), constant(0.0))
        statistics += [mean.output(0), ops.sqrt(variance).output(0)]
    return statistics


def patch_features(backbone: ov.Model, size: int) -> tuple[ops.Parameter, ov.Output]:
    """A new u8 NHWC BGR input ``input`` (1 x size x size x 3) and the raw patch features: 1 x 66 x G x G.

    G = size / 4. Channels 0-63 are the pooled deep taps, 64 and 65 the local grey mean and standard deviation
    (0-255 scale, not yet standardised: training and the scoring graph apply the training statistics). The
    backbone runs on the frame mirrored by BORDER_PAD px, and the grid is cropped back to the frame.
    """
    padded_size = size + 2 * BORDER_PAD
    extractor = feature_extractor(backbone, list(TAPS), (padded_size, padded_size))
    inner = extractor.get_parameters()[0]
    parameter = ops.parameter([1, size, size, 3], ov.Type.u8, name=INPUT_NAME)
    parameter.output(0).get_tensor().set_names({INPUT_NAME})
    frame = parameter.output(0)
    if BORDER_PAD:
        frame = ops.pad(frame, constant([0, BORDER_PAD, BORDER_PAD, 0], np.int64),
                        constant([0, BORDER_PAD, BORDER_PAD, 0], np.int64), "reflect").output(0)
    for consumer in inner.output(0).get_target_inputs():
        consumer.replace_source_output(frame)
    deep = deep_taps(extractor, padded_size // GRID_STRIDE)

    # Local grey statistics of the (mirrored) frame: a window every 4 px, on the same grid as the taps.
    statistics = grey_statistics(ops.convert(frame, ov.Type.f32).output(0), INTENSITY_WINDOWS)
    features = ops.concat([deep, *statistics], 1).output(0)
    if BORDER_PAD:
        first, last = BORDER_PAD // GRID_STRIDE, (BORDER_PAD + size) // GRID_STRIDE
        features = ops.slice(features, constant([first, first], np.int64), constant([last, last], np.int64),
                             constant([1, 1], np.int64), constant([2, 3], np.int64)).output(0)
    return parameter, features


def feature_model(backbone: ov.Model, size: int, name: str = "anomaly_features") -> ov.Model:
    """The patch features alone as a model: `input` in, `features` (1 x FEATURE_CHANNELS x G x G, raw) out."""
    parameter, features = patch_features(backbone, size)
    result = ops.result(features)
    result.output(0).get_tensor().set_names({"features"})
    return ov.Model([result], [parameter], name)



def compile_f32(model: ov.Model, device: str = "CPU", **properties: Any) -> ov.CompiledModel:
    """Compile with the precision pinned to f32 on CPU: bf16, the default on CPUs with AVX-512 BF16, shifts
    the scores (MODELS.md 5: 0.828 -> 0.823 mean image AUROC, and scores that differ between PCs)."""
    config: dict[str, Any] = dict(properties)
    if device.upper().startswith("CPU"):
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return core().compile_model(model, device, config)


def infer_all(compiled: ov.CompiledModel, frames: Iterable[np.ndarray], collect: Callable[[int, np.ndarray], None]
              ) -> None:
    """Infer every frame (u8 H x W x 3 BGR), the device's optimal number of requests in flight; ``collect(index,
    output)`` gets each frame's first output (a view, valid during the call) in the order requests finish.

    One frame per request: two requests of one view each took 1.0 s for 160 views on 2 cores, where batches of 8
    took 1.8-6 s. An exception in ``collect`` is raised here (OpenVINO's callback thread would drop it).
    """
    failures: list[BaseException] = []

    def done(request: ov.InferRequest, index: int) -> None:
        try:
            collect(index, request.get_output_tensor(0).data[0])
        except BaseException as error:
            failures.append(error)

    queue = ov.AsyncInferQueue(compiled, max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))))
    queue.set_callback(done)
    for index, frame in enumerate(frames):
        queue.start_async({0: frame[None]}, index)
    queue.wait_all()
    if failures:
        raise failures[0]


def default_backbone() -> Path:
    """efficientnet_lite0/<current>/model.xml in the pretrained store: $APPLIANCE_MODEL_STORE, else a source
    checkout's models/, else ~/.local/share/appliance/models (appliance/paths.py)."""
    store = model_store()
    model_dir = store / BACKBONE
    version = read_current(model_dir)
    if version is None:
        raise TrainingError(f"no backbone: {model_dir / 'current'} not found; run `make models` "
                            f"(or pass --backbone PATH/model.xml)")
    return model_dir / version / "model.xml"


def read_backbone(backbone_xml: Path) -> ov.Model:
    backbone_xml = Path(backbone_xml)
    if not backbone_xml.is_file():
        raise TrainingError(f"backbone {backbone_xml} not found: run `make models`")
    return core().read_model(str(backbone_xml))


def backbone_name(backbone_xml: Path) -> str:
    """`efficientnet_lite0/1`: the backbone's store name and version, for the trained model's spec."""
    version_dir = Path(backbone_xml).resolve().parent
    return f"{version_dir.parent.name}/{version_dir.name}"
