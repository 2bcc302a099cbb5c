"""appliance/runtime/openvino.py: what the OpenVINO backend does to a network at load, seen from its outputs.

The graph takes u8 BGR NHWC frames and, where shapes may be dynamic, any frame size (resized linearly inside
it); the profile's static shapes turn that off; its performance hint reaches the compiled model; segmentation
networks get their best class and its probability appended.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import yaml

from appliance.config.profile import load_profile
from appliance.runtime.compiled import InputDescription
from appliance.runtime.models import RuntimeOptions
from appliance.runtime.openvino import SEGMENT_CLASS, SEGMENT_PROBABILITY, OpenVinoModel
from appliance.runtime.store import StoreError, switch_current, write_manifest

SIZE = 16


def save_mirror(store: Path, task: str = "classify", activation: str | None = None) -> Path:
    """A network that returns its input (f32, NCHW, RGB, pixel / 255): what the graph made of the frame."""
    image = ops.parameter([1, 3, SIZE, SIZE], ov.Type.f32, name="input")
    output = ops.multiply(image, ops.constant(np.float32(1))).output(0)
    output.set_names({"mirror"})
    version_dir = store / "mirror" / "1"
    version_dir.mkdir(parents=True)
    ov.save_model(ov.Model([output], [image], "mirror"), version_dir / "model.xml")
    spec: dict = {"task": task, "input": {"size": [SIZE, SIZE], "element_type": "f32", "layout": "NCHW",
                                          "colour_order": "RGB", "scale": 1 / 255}}
    if activation is not None:
        spec["activation"] = activation
    (version_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    write_manifest(version_dir)
    switch_current(store / "mirror", "1")
    return version_dir


def frame(width: int, height: int) -> np.ndarray:
    """A smooth BGR ramp (a linear resize of it has no aliasing to disagree about)."""
    xs, ys = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return np.stack([xs, ys, 255 - xs], axis=2).astype(np.uint8)


def as_bgr_u8(output: np.ndarray) -> np.ndarray:
    return np.rint(output[0].transpose(1, 2, 0)[..., ::-1] * 255).astype(np.int32)


def test_a_frame_of_any_size_is_resized_in_the_graph_as_opencv_resizes_it_linearly(tmp_path: Path) -> None:
    model = OpenVinoModel("mirror", save_mirror(tmp_path), RuntimeOptions("CPU"))
    assert model.input == InputDescription((1, -1, -1, 3), any_size=True, name="input")
    assert model.input_size == (SIZE, SIZE)
    camera = frame(97, 61)
    in_graph = as_bgr_u8(model.infer(camera[None])["mirror"])
    by_opencv = cv2.resize(camera, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.int32)
    assert np.abs(in_graph - by_opencv).max() <= 2, np.abs(in_graph - by_opencv).max()
    # A frame already at the model's size goes through unchanged (scale and colour order undone above).
    exact = frame(SIZE, SIZE)
    assert np.abs(as_bgr_u8(model.infer(exact[None])["mirror"]) - exact).max() <= 1


def test_static_shapes_from_the_profile_fix_the_input_and_refuse_a_dynamic_one(tmp_path: Path) -> None:
    version_dir = save_mirror(tmp_path)
    static = RuntimeOptions("CPU", static_shapes=True)
    model = OpenVinoModel("mirror", version_dir, static)
    assert model.input == InputDescription((1, SIZE, SIZE, 3), any_size=False, name="input")
    with pytest.raises(RuntimeError):
        model.infer(frame(97, 61)[None])  # the node resizes first on such a device
    with pytest.raises(StoreError, match=r"^model 'mirror' version 1: input shape \[1, -1, -1\] has dynamic "
                                         r"dimensions, which CPU \(static_shapes in the profile\) cannot run$"):
        OpenVinoModel("mirror", version_dir, static, input_shape=(1, -1, -1))


def test_a_node_that_asks_for_dynamic_sizes_gets_them_without_a_resize(tmp_path: Path) -> None:
    model = OpenVinoModel("mirror", save_mirror(tmp_path), RuntimeOptions("CPU"), input_shape=(-1, SIZE, -1))
    assert model.input == InputDescription((-1, SIZE, -1, 3), any_size=False, name="input")
    assert model.infer(np.zeros((2, SIZE, 40, 3), np.uint8))["mirror"].shape == (2, 3, SIZE, 40)


@pytest.mark.parametrize("profile_name, hint", [("cpu", "LATENCY"), ("auto", "THROUGHPUT")])
def test_the_profiles_performance_hint_reaches_a_nodes_own_device(tmp_path: Path, profile_name: str,
                                                                   hint: str) -> None:
    profile, _ = load_profile(profile_name)
    assert profile is not None
    options = RuntimeOptions.from_profile(profile, "CPU", None).for_device("CPU")
    assert options.properties == {} and options.performance == hint.lower()
    model = OpenVinoModel("mirror", save_mirror(tmp_path), options)
    assert str(model.compiled.get_property("PERFORMANCE_HINT")) == hint


def test_a_profile_without_a_hint_property_uses_its_performance_key(tmp_path: Path) -> None:
    profile, _ = load_profile("cpu")
    assert profile is not None
    latency_by_key = profile.model_copy(update={"properties": {}, "performance": "latency"})
    model = OpenVinoModel("mirror", save_mirror(tmp_path), RuntimeOptions.from_profile(latency_by_key, "CPU", None))
    assert str(model.compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert model.slots == 1  # LATENCY: one request on all cores


def test_a_segmentation_network_gets_its_best_class_and_probability_in_the_graph(tmp_path: Path) -> None:
    model = OpenVinoModel("mirror", save_mirror(tmp_path, "segment", "softmax"), RuntimeOptions("CPU"))
    assert model.output_names == ["mirror", SEGMENT_PROBABILITY, SEGMENT_CLASS]
    # Pure red, green, blue thirds: class 0 (red, the network's RGB order) wins on the first, 2 on the last.
    camera = np.zeros((SIZE, 3 * SIZE, 3), np.uint8)
    camera[:, :SIZE, 2], camera[:, SIZE:2 * SIZE, 1], camera[:, 2 * SIZE:, 0] = 255, 255, 255
    outputs = model.infer(cv2.resize(camera, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)[None])
    best, probability = outputs[SEGMENT_CLASS][0, 0], outputs[SEGMENT_PROBABILITY][0, 0]
    assert best[:, 0].tolist() == [0] * SIZE and best[:, -1].tolist() == [2] * SIZE
    softmax_of_one_hot = np.exp(1) / (np.exp(1) + 2)
    assert abs(float(probability[0, 0]) - softmax_of_one_hot) < 1e-5
