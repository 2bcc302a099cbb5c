"""The learned discriminator (training/discriminator.py) on the real backbone: its graph, thresholds and anomalies."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest

from appliance.runtime.models import LoadedModel, RuntimeOptions
from appliance.runtime.spec import AnomalySpec, read_spec
from appliance.training import TrainingError
from appliance.training.anomaly import TrainedAnomaly
from appliance.training.bank import augmentations
from appliance.training.defects import add_defect
from appliance.training.discriminator import (
    FAST,
    MODES,
    THOROUGH,
    Discriminator,
    calibrated_threshold,
    feature_model,
    gumbel_threshold,
    numpy_maps,
    pixel_quantile,
    scoring_model,
    single_threaded_blas,
    synthetic_anomalies,
    tail_size,
    top_pixels,
    train_discriminator,
    train_mlp,
    upscaled_patch_features,
)
from appliance.training.export import save_anomaly_model
from appliance.training.features import FEATURE_CHANNELS, compile_f32
from appliance.training.features import feature_model as bank_feature_model
from appliance.training.scoring import predict
from appliance.training.surfaces import SURFACES
from tests.training.conftest import assert_flagged_where_it_is, brick_crop


def sand_part(seed: int) -> np.ndarray:
    """A 256x256 instance of the procedural sand: each seed another part, as on a line."""
    return SURFACES["sand"](seed, size=256)


@pytest.fixture(scope="module")
def sand_discriminator(backbone_xml: Path) -> TrainedAnomaly:
    return train_discriminator([sand_part(seed) for seed in range(100, 112)], backbone_xml, mode="fast", seed=3)


@pytest.mark.parametrize("colour", [False, True])
def test_synthetic_anomalies_are_seeded_and_covered(colour: bool) -> None:
    image = brick_crop(0, np.random.default_rng(1))
    if colour:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    before = image.copy()
    first, coverage = synthetic_anomalies(image, np.random.default_rng(7), count=3)
    again, again_coverage = synthetic_anomalies(image, np.random.default_rng(7), count=3)
    assert np.array_equal(first, again) and np.array_equal(coverage, again_coverage)
    assert first.shape == image.shape and first.dtype == np.uint8 and coverage.shape == image.shape[:2]
    assert np.array_equal(image, before)  # the input is left as it was
    changed = first != image
    if colour:
        changed = changed.any(axis=2)
    # Every changed pixel is inside the coverage the MLP learns from, and the anomalies change something.
    assert changed.any() and not (changed & (coverage == 0)).any()
    assert 0.0 <= coverage.min() and coverage.max() <= 1.0


def test_synthetic_anomalies_refuse_other_than_u8() -> None:
    with pytest.raises(ValueError, match="u8 grey or colour image, got float32"):
        synthetic_anomalies(np.zeros((64, 64), np.float32), np.random.default_rng(0))


def test_features_at_scale_1_are_the_bank_models_features(backbone_xml: Path) -> None:
    backbone = ov.Core().read_model(backbone_xml)
    image = cv2.cvtColor(brick_crop(0, np.random.default_rng(5)), cv2.COLOR_GRAY2BGR)[None]
    ours = compile_f32(feature_model(backbone, 256, 1)).create_infer_request().infer({0: image})[0]
    theirs = compile_f32(bank_feature_model(backbone, 256)).create_infer_request().infer({0: image})[0]
    assert np.array_equal(ours, theirs)
    enlarged = compile_f32(feature_model(backbone, 256, 1.5)).create_infer_request().infer({0: image})[0]
    assert enlarged.shape == (1, FEATURE_CHANNELS, 96, 96)
    with pytest.raises(TrainingError, match="upscale 1.25 does not put a 256 px frame on whole 4 px cells"):
        upscaled_patch_features(backbone, 256, 1.25)


def test_mlp_learns_to_rank_anomalous_cells_above_good_ones() -> None:
    rng = np.random.default_rng(0)
    scale = np.array([1, 1, 1, 1, 10, 50], np.float32)
    offset = np.array([0, 0, 0, 0, 100, 3000], np.float32)
    shift = np.array([3, 0, 0, 0, 0, 0], np.float32)
    good = rng.normal(0, 1, (4000, 6)).astype(np.float32) * scale + offset
    anomalous = good[:1000] + shift
    with single_threaded_blas():
        discriminator = train_mlp(good, anomalous, np.random.default_rng(1), hidden=16, steps=300)
    # Raw features in, standardisation folded into the first layer: the scales of the channels do not matter.
    fresh_good = rng.normal(0, 1, (500, 6)).astype(np.float32) * scale + offset
    fresh_anomalous = fresh_good + shift
    good_logits = discriminator.logits(fresh_good)
    anomalous_logits = discriminator.logits(fresh_anomalous)
    assert (anomalous_logits[:, None] > good_logits[None, :]).mean() > 0.9


def test_numpy_maps_match_the_graph(backbone_xml: Path) -> None:
    # Thresholds come from maps computed in numpy: they must be the graph's maps, at both scales.
    backbone = ov.Core().read_model(backbone_xml)
    image = cv2.cvtColor(brick_crop(0, np.random.default_rng(6)), cv2.COLOR_GRAY2BGR)
    rng = np.random.default_rng(2)
    discriminator = Discriminator(rng.normal(0, 0.05, (FEATURE_CHANNELS, 16)).astype(np.float32),
                                  rng.normal(0, 1, 16).astype(np.float32), rng.normal(0, 1, 16).astype(np.float32),
                                  0.0)
    for mode in (FAST, THOROUGH):
        raw = compile_f32(feature_model(backbone, 256, mode.upscale)).create_infer_request().infer({0: image[None]})[0]
        # Logits around 0, as a trained model's are near its threshold (far below it, OpenVINO's softplus rounds
        # values under 1e-6 to 0, which no threshold sees).
        discriminator.b2 = 0.0
        discriminator.b2 = -float(np.median(discriminator.logits(raw[0].reshape(FEATURE_CHANNELS, -1).T)))
        expected = numpy_maps(raw, discriminator, 256, mode)[0]
        score, anomaly_map = predict(compile_f32(scoring_model(backbone, 256, mode, discriminator)), image)
        np.testing.assert_allclose(anomaly_map, expected, rtol=1e-3, atol=1e-3 * float(expected.max()))
        assert score == pytest.approx(float(anomaly_map.max()))
        assert float(anomaly_map.min()) >= 0  # softplus: positive like the bank's distances, as anomaly@1 expects


def test_held_out_good_crops_pass_and_a_hole_is_flagged_where_it_is(sand_discriminator: TrainedAnomaly) -> None:
    request = compile_f32(sand_discriminator.model).create_infer_request()
    good_scores = [predict(request, sand_part(seed))[0] for seed in range(200, 210)]
    assert sum(score < sand_discriminator.threshold for score in good_scores) >= 9, good_scores
    rng = np.random.default_rng(11)
    for seed in range(210, 213):
        image, mask = add_defect(sand_part(seed), "hole", rng)
        assert_flagged_where_it_is(request, image, mask, sand_discriminator.threshold)


def test_threshold_comes_from_held_out_images(sand_discriminator: TrainedAnomaly) -> None:
    metrics = sand_discriminator.metrics
    # 12 images: 3 held out for the threshold, 9 train in their 8 rotations x flips.
    assert metrics["mode"] == "fast" and metrics["calibration_images"] == 3 and metrics["training_images"] == 9
    assert metrics["views"] == 72 and metrics["anomalous_cells"] > 0
    assert len(sand_discriminator.leave_out_scores) == 3
    assert max(sand_discriminator.leave_out_scores.values()) < sand_discriminator.threshold
    # The views widen the sample; they never bring the threshold below the images' own rule.
    own_rule, _ = calibrated_threshold(list(sand_discriminator.leave_out_scores.values()))
    assert sand_discriminator.threshold >= own_rule - 1e-6
    # Each held-out image counts in its 8 rotations x flips: 24 maxima for the fit, each image as it is listed.
    assert "held-out good scores" in metrics["threshold_rule"] and "8 views" in metrics[
        "threshold_rule"]
    assert set(metrics["timings"]) >= {"good_features", "anomaly_features", "mlp", "calibration"}


def test_pixel_threshold_is_what_one_held_out_good_pixel_in_a_thousand_reaches(
        sand_discriminator: TrainedAnomaly) -> None:
    # Regions (anomaly@1: above the pixel threshold, reaching the image threshold) start where good pixels end:
    # the 99.9th percentile of the maps of the held-out images in their 8 rotations x flips, as the graph makes them.
    request = compile_f32(sand_discriminator.model).create_infer_request()
    held_out = sorted(sand_discriminator.leave_out_scores)
    images = [sand_part(seed) for seed in range(100, 112)]
    maps = [predict(request, view)[1] for index in held_out for view in augmentations(images[index])]
    assert len(maps) == 24
    expected = float(np.percentile(np.stack(maps), 99.9))
    assert sand_discriminator.pixel_threshold == pytest.approx(expected, rel=1e-3)
    assert sand_discriminator.pixel_threshold < sand_discriminator.threshold / 2
    assert sand_discriminator.metrics["pixel_threshold_rule"] == "99.9% quantile of the map pixels of 24 held-out " \
                                                                  "good views"


def test_pixel_quantile_from_each_maps_top_pixels_is_numpys_percentile() -> None:
    rng = np.random.default_rng(4)
    maps = [rng.gamma(1.0, size=(48, 48)).astype(np.float32) * scale for scale in (0.5, 1, 3)]
    maps[1][:6, :6] = 40  # one map holds the whole tail
    total = 3 * 48 * 48
    for share in (0.001, 0.01, 0.3):
        tops = [top_pixels(anomaly_map, tail_size(total, share)) for anomaly_map in maps]
        assert pixel_quantile(tops, total, share) == pytest.approx(
            float(np.percentile(np.stack(maps).astype(np.float64), 100 * (1 - share))), rel=1e-6)


def test_stored_model_loads_in_the_runtime_like_a_bank_model(sand_discriminator: TrainedAnomaly,
                                                             tmp_path: Path) -> None:
    save_anomaly_model(sand_discriminator, tmp_path / "surface")
    spec = read_spec(tmp_path / "surface" / "1")
    assert isinstance(spec, AnomalySpec) and spec.threshold == pytest.approx(sand_discriminator.threshold, rel=1e-5)
    loaded = LoadedModel("surface", tmp_path / "surface" / "1",
                         RuntimeOptions("CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
    image = cv2.cvtColor(sand_part(300), cv2.COLOR_GRAY2BGR)
    result = loaded.infer(image[None])
    score, anomaly_map = predict(compile_f32(sand_discriminator.model), image)
    assert float(result["pred_score"][0]) == pytest.approx(score, rel=1e-4)
    assert list(result["anomaly_map"].shape) == [1, 1, 256, 256]


def test_gumbel_threshold_reads_the_fitted_quantile() -> None:
    rng = np.random.default_rng(0)
    scores = rng.gumbel(3.0, 0.5, 20000)
    # The 99th percentile of Gumbel(3, 0.5) is 3 - 0.5 ln(-ln 0.99) = 5.300.
    assert gumbel_threshold(scores, 0.01) == pytest.approx(5.300, abs=0.03)
    assert gumbel_threshold(scores, 0.001) > gumbel_threshold(scores, 0.01)
    with pytest.raises(ValueError, match="at least 2 scores"):
        gumbel_threshold([1.0])


def test_calibrated_threshold_never_falls_below_the_max_rule() -> None:
    threshold, rule = calibrated_threshold([1.0] * 19 + [5.0])
    # One far outlier: the max rule (5 + 0.5 x (5 - 1) = 7) is above the Gumbel fit (5.6).
    assert threshold == pytest.approx(7.0) and rule.startswith("max of 20 held-out good scores")
    threshold, rule = calibrated_threshold(np.linspace(1.0, 2.0, 20))
    assert threshold > 2.5 and rule.startswith("Gumbel fit of 20 held-out good scores at 0.1% false rejects")


def test_unknown_mode_and_too_few_images_are_refused(backbone_xml: Path) -> None:
    crops = [brick_crop(0, np.random.default_rng(i)) for i in range(3)]
    with pytest.raises(TrainingError, match="unknown mode 'slow'; known: fast, thorough"):
        train_discriminator(crops, backbone_xml, mode="slow")
    with pytest.raises(TrainingError, match="need at least 2 good images, got 1"):
        train_discriminator(crops[:1], backbone_xml)
    assert set(MODES) == {"fast", "thorough"}
