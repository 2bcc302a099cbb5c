"""EfficientNet-lite0 and MobileNetV2 rebuilt with openvino.opset13 against MODELS.md's real-image checks."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
from skimage import data

from appliance.supply.backbones import efficientnet_lite0, mobilenet_v2_backbone
from appliance.training.features import feature_extractor, tensor_names
from tests.supply.conftest import compile_f32, imagenet_crop_bgr

CAT_CLASSES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}
ESPRESSO = 967


@pytest.fixture(scope="module")
def classifier(efficientnet_state: dict[str, np.ndarray]) -> ov.Model:
    return efficientnet_lite0(efficientnet_state)


@pytest.fixture(scope="module")
def backbone(mobilenet_state: dict[str, np.ndarray]) -> ov.Model:
    return mobilenet_v2_backbone(mobilenet_state)


def test_classifier_takes_u8_bgr_nhwc_and_gives_probabilities(classifier: ov.Model) -> None:
    assert classifier.input().get_any_name() == "input"
    assert classifier.input().get_element_type() == ov.Type.u8
    assert list(classifier.input().get_shape()) == [1, 224, 224, 3]
    assert classifier.output().get_any_name() == "probabilities"
    assert list(classifier.output().get_shape()) == [1, 1000]


def test_chelsea_is_a_cat_and_coffee_is_espresso(core: ov.Core, classifier: ov.Model) -> None:
    compiled = compile_f32(core, classifier)
    chelsea = compiled(imagenet_crop_bgr(data.chelsea()))[0][0]
    coffee = compiled(imagenet_crop_bgr(data.coffee()))[0][0]
    assert abs(float(chelsea.sum()) - 1) < 1e-4
    assert int(np.argmax(chelsea)) in CAT_CLASSES
    # MODELS.md: the three cat classes together take 0.92 of the mass.
    assert sum(float(chelsea[i]) for i in CAT_CLASSES) > 0.85
    assert int(np.argmax(coffee)) == ESPRESSO and float(coffee[ESPRESSO]) > 0.9


def test_mobilenet_embedding_separates_chelsea_from_coffee(core: ov.Core, backbone: ov.Model) -> None:
    compiled = compile_f32(core, backbone)
    crop = imagenet_crop_bgr(data.chelsea())
    chelsea = compiled(crop)[0][0]
    mirrored = compiled(np.ascontiguousarray(crop[:, :, ::-1]))[0][0]
    coffee = compiled(imagenet_crop_bgr(data.coffee()))[0][0]
    assert chelsea.shape == (1280,)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert cosine(chelsea, mirrored) > 0.95
    assert cosine(chelsea, coffee) < 0.6


@pytest.mark.parametrize(("network", "taps", "size", "shapes"), [
    ("classifier", ["blocks.2", "blocks.4", "blocks.10"], (224, 224), [(1, 24, 56, 56), (1, 40, 28, 28), (1, 112, 14, 14)]),
    ("classifier", ["blocks.2", "blocks.4"], (256, 256), [(1, 24, 64, 64), (1, 40, 32, 32)]),
    ("backbone", ["features.3", "features.6", "features.13"], (224, 224),
     [(1, 24, 56, 56), (1, 32, 28, 28), (1, 96, 14, 14)]),
    ("backbone", ["features.3", "features.6"], (256, 320), [(1, 24, 64, 80), (1, 32, 32, 40)]),
])
def test_taps_have_the_shapes_of_models_md(request: pytest.FixtureRequest, core: ov.Core, network: str,
                                           taps: list[str], size: tuple[int, int],
                                           shapes: list[tuple[int, ...]]) -> None:
    model: ov.Model = request.getfixturevalue(network)
    extractor = feature_extractor(model, taps, size)
    assert [o.get_any_name() for o in extractor.outputs] == taps
    assert list(extractor.input().get_shape()) == [1, *size, 3]
    frame = np.random.default_rng(0).integers(0, 256, (1, *size, 3), dtype=np.uint8)
    results = compile_f32(core, extractor)(frame)
    assert [results[name].shape for name in taps] == shapes
    # The original model is left as it was.
    assert list(model.input().get_shape()) == [1, 224, 224, 3]


def test_feature_extractor_taps_equal_the_full_model_tensors(core: ov.Core, classifier: ov.Model) -> None:
    frame = imagenet_crop_bgr(data.chelsea())
    full = classifier.clone()
    full.add_outputs(["blocks.4"])
    expected = compile_f32(core, full)(frame)["blocks.4"]
    extractor = feature_extractor(classifier, ["blocks.4"], (224, 224))
    np.testing.assert_allclose(compile_f32(core, extractor)(frame)[0], expected, rtol=1e-5, atol=1e-5)


def test_every_block_output_is_named(classifier: ov.Model, backbone: ov.Model) -> None:
    assert tensor_names(classifier)[:18] == ["stem", *(f"blocks.{i}" for i in range(16)), "head"]
    assert [f"features.{i}" for i in range(19)] == [n for n in tensor_names(backbone) if n.startswith("features.")]


def test_unknown_tap_lists_the_known_ones(classifier: ov.Model) -> None:
    with pytest.raises(KeyError, match=r"unknown tap blocks\.16; known: stem, blocks\.0"):
        feature_extractor(classifier, ["blocks.16"], (224, 224))


def test_a_state_dict_with_a_missing_weight_is_refused(efficientnet_state: dict[str, np.ndarray]) -> None:
    broken = {k: v for k, v in efficientnet_state.items() if k != "_blocks.7._bn1.running_var"}
    with pytest.raises(KeyError, match="_blocks.7._bn1.running_var"):
        efficientnet_lite0(broken)
