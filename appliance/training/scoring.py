"""The anomaly scoring graph: patch features -> distance to the bank -> blurred, upsampled map -> score.

Everything after the u8 input is one OpenVINO model: ``input`` u8 NHWC BGR 1 x size x size x 3 in,
``anomaly_map`` (1 x 1 x size x size, f32) and ``pred_score`` ([1], f32) out, the names anomalib's OpenVINO
export uses, so the anomaly@1 node runs both. The bank, radii and standardisation are constants of the graph.
``leave_out_maps`` computes the same maps in numpy (for thresholds from training images), and must agree with it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import openvino as ov
import openvino.opset13 as ops

from appliance.training.bank import Bank
from appliance.training.features import GRID_STRIDE, constant, patch_features
from appliance.training.images import prepare_image

MAP_SIGMA = 1.0  # grid cells (4 px); sigma 2 or 8 px lost 0.01-0.02 AUROC (MODELS.md 5)
MAP_KERNEL = 7  # 3 sigma either side
OUTPUT_MAP = "anomaly_map"
OUTPUT_SCORE = "pred_score"


def gaussian_kernel() -> np.ndarray:
    return cv2.getGaussianKernel(MAP_KERNEL, MAP_SIGMA).astype(np.float32).ravel()


def scoring_model(backbone: ov.Model, size: int, bank: Bank) -> ov.Model:
    parameter, features = patch_features(backbone, size)
    grid = size // GRID_STRIDE
    channels = bank.entries.shape[1]
    patches = ops.transpose(ops.reshape(features, constant([0, channels, -1], np.int64), True),
                            constant([0, 2, 1], np.int64))  # B x G^2 x C
    standard = ops.add(ops.multiply(patches, constant(bank.scale)), constant(bank.offset))
    norm2 = ops.reduce_sum(ops.multiply(standard, standard), constant([2], np.int64), True)
    # One matmul against a constant: OpenVINO runs it as a pre-packed fully connected layer. Computing
    # |f|^2 - 2 f.e + |e|^2 loses precision in bf16, hence the f32 pin when compiling (MODELS.md 5).
    matrix, bias = bank.weights()
    distances = ops.add(ops.matmul(ops.concat([standard, norm2], 2), constant(matrix), False, False), constant(bias))
    nearest = ops.maximum(ops.reduce_min(distances, constant([2], np.int64), False), constant(0.0))
    grid_map = ops.reshape(nearest, constant([0, 1, grid, grid], np.int64), True)
    half = MAP_KERNEL // 2
    padded = ops.pad(grid_map, constant([0, 0, half, half], np.int64), constant([0, 0, half, half], np.int64),
                     "reflect")  # = OpenCV's BORDER_REFLECT_101, which the leave-one-out scores use
    kernel = gaussian_kernel()
    blurred = ops.convolution(padded, constant(kernel.reshape(1, 1, MAP_KERNEL, 1)), [1, 1], [0, 0], [0, 0], [1, 1])
    blurred = ops.convolution(blurred, constant(kernel.reshape(1, 1, 1, MAP_KERNEL)), [1, 1], [0, 0], [0, 0], [1, 1])
    anomaly_map = ops.interpolate(blurred, constant([size, size], np.int64), "linear_onnx", "sizes",
                                  coordinate_transformation_mode="half_pixel", axes=constant([2, 3], np.int64))
    return anomaly_model(anomaly_map, parameter, "anomaly_patchcore_lite")


def anomaly_model(anomaly_map: ov.Node, parameter: ops.Parameter, name: str) -> ov.Model:
    """The graph anomaly@1 runs: ``anomaly_map`` (1 x 1 x H x W) and its maximum as the image score, under the
    output names the node reads (OUTPUT_MAP, OUTPUT_SCORE)."""
    score = ops.reduce_max(anomaly_map, constant([1, 2, 3], np.int64), False)
    map_result, score_result = ops.result(anomaly_map), ops.result(score)
    for result, output_name in ((map_result, OUTPUT_MAP), (score_result, OUTPUT_SCORE)):
        result.input_value(0).get_tensor().set_names({output_name})
        result.input_value(0).get_node().set_friendly_name(output_name)
        result.output(0).get_tensor().set_names({output_name})
    return ov.Model([map_result, score_result], [parameter], name)



def leave_out_maps(features: np.ndarray, bank: Bank, size: int, images: np.ndarray | None = None) -> np.ndarray:
    """Maps of training images (``features``: N x C x G^2, raw) scored without the bank entries they gave.

    ``images`` are their indices in the training set (``bank.source`` values); None leaves nothing out.
    A training image scored against a bank that holds its own patches gets a score near zero, nothing like a
    new good part's. Dropping its own entries (about 1024 / N of them) gives the score a new image of the same
    kind gets, for one 4096 x 67 x 1024 matrix product per image (~25 ms) instead of training N banks. The map
    is finished as the graph does (clamp, Gaussian with reflect-101 border, bilinear half-pixel upsampling), so
    these scores compare with the model's; a test checks that they agree.
    """
    matrix, bias = bank.weights()
    kernel = gaussian_kernel()
    grid = int(round(math.sqrt(features.shape[2])))
    maps = np.empty((len(features), size, size), np.float32)
    for position, raw in enumerate(features):
        standard = raw.T * bank.scale + bank.offset
        augmented = np.concatenate([standard, (standard * standard).sum(1, keepdims=True)], axis=1)
        distances = augmented @ matrix + bias
        if images is not None:
            own = bank.source == images[position]
            if not own.all():  # only possible with a single training image
                distances[:, own] = np.inf
        nearest = np.maximum(distances.min(1), 0.0).reshape(grid, grid)
        blurred = cv2.sepFilter2D(nearest, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
        maps[position] = cv2.resize(blurred, (size, size), interpolation=cv2.INTER_LINEAR)
    return maps



def predict(compiled: ov.CompiledModel | ov.InferRequest, image: np.ndarray) -> tuple[float, np.ndarray]:
    """The image score and the size x size anomaly map of one image (any size, grey or BGR u8)."""
    request = compiled.create_infer_request() if isinstance(compiled, ov.CompiledModel) else compiled
    shape = request.get_input_tensor(0).get_shape()
    outputs = request.infer({0: prepare_image(image, int(shape[1]))[None]})
    score = float(np.asarray(outputs[OUTPUT_SCORE]).reshape(-1)[0])
    anomaly_map = np.asarray(outputs[OUTPUT_MAP], np.float32).reshape(shape[1], shape[2]).copy()
    return score, anomaly_map

