"""`appliance train anomaly` on the real backbone: the stored model, its thresholds, its one graph, the CLI, AUROC."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest
import yaml

from appliance.runtime.models import LoadedModel, RuntimeOptions
from appliance.runtime.spec import AnomalySpec, read_spec
from appliance.runtime.store import StoreError, read_current, verify_manifest
from appliance.training.anomaly import STAGES, TrainedAnomaly, train_anomaly
from appliance.training.bank import Bank, local_radius2
from appliance.training.cli import anomaly_main as main
from appliance.training.defects import add_defect
from appliance.training.demo_parts import bad_parts, good_parts, write_demo_images
from appliance.training.export import save_anomaly_model
from appliance.training.features import FEATURE_CHANNELS, compile_f32, feature_model
from appliance.training.metrics import auroc, f1_threshold, youden_threshold
from appliance.training.scoring import leave_out_maps, predict, scoring_model
from tests.training.conftest import assert_flagged_where_it_is, brick_crop


@pytest.fixture(scope="module")
def brick_model(backbone_xml: Path) -> TrainedAnomaly:
    rng = np.random.default_rng(3)
    return train_anomaly([brick_crop(0, rng) for _ in range(10)], backbone_xml, seed=3)


@pytest.fixture(scope="module")
def brick_request(brick_model: TrainedAnomaly) -> ov.InferRequest:
    return compile_f32(brick_model.model).create_infer_request()


def test_saved_model_has_the_spec_manifest_and_current_pointer(brick_model: TrainedAnomaly, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "surface"
    source = {"good": "brick crops", "good_images": [f"crop_{i}" for i in range(10)]}
    assert save_anomaly_model(brick_model, model_dir, source=source) == "1"
    version_dir = model_dir / "1"
    assert sorted(p.name for p in version_dir.iterdir()) == ["manifest.json", "model.bin", "model.xml", "spec.yaml"]
    verify_manifest(version_dir)
    assert set(json.loads((version_dir / "manifest.json").read_text())["files"]) == {"model.bin", "model.xml",
                                                                                    "spec.yaml"}
    assert read_current(model_dir) == "1"
    spec = yaml.safe_load((version_dir / "spec.yaml").read_text())
    assert spec["task"] == "anomaly"
    assert spec["input"] == {"name": "input", "size": [256, 256], "element_type": "u8", "layout": "NHWC",
                             "colour_order": "BGR"}
    assert spec["outputs"] == {"score": "pred_score", "map": "anomaly_map"}
    assert spec["labels"] == [{"id": 1, "name": "anomaly", "color": "#ff0000"}]
    assert 0 < spec["pixel_threshold"] <= spec["threshold"]
    assert spec["threshold"] == brick_model.threshold
    training = spec["training"]
    assert training["images"] == 10 and training["backbone"] == "efficientnet_lite0/1"
    assert 0 < training["seconds"] < 30 and "blocks.2+blocks.4" in training["recipe"]
    assert training["metrics"]["bank_size"] == 1024 and spec["source"] == source
    # The runtime's own reader accepts it, and the next save is version 2 with current moved to it.
    typed = read_spec(version_dir)
    assert isinstance(typed, AnomalySpec) and typed.outputs.map == "anomaly_map"
    assert typed.threshold == pytest.approx(brick_model.threshold, rel=1e-5)
    assert save_anomaly_model(brick_model, model_dir) == "2" and read_current(model_dir) == "2"
    with pytest.raises(StoreError, match=r"model 'surface' version 1 exists .*never overwritten"):
        save_anomaly_model(brick_model, model_dir, version="1")
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "current"]  # no staging folder left


def test_stored_graph_takes_u8_frames_and_gives_anomalib_outputs(brick_model: TrainedAnomaly, tmp_path: Path) -> None:
    save_anomaly_model(brick_model, tmp_path / "m")
    model = ov.Core().read_model(tmp_path / "m" / "1" / "model.xml")
    (parameter,) = model.inputs
    assert parameter.get_any_name() == "input" and parameter.get_element_type() == ov.Type.u8
    assert list(parameter.get_shape()) == [1, 256, 256, 3]
    outputs = {output.get_any_name(): output for output in model.outputs}
    assert set(outputs) == {"anomaly_map", "pred_score"}
    assert list(outputs["anomaly_map"].get_shape()) == [1, 1, 256, 256]
    assert list(outputs["pred_score"].get_shape()) == [1]
    assert all(output.get_element_type() == ov.Type.f32 for output in outputs.values())
    # The appliance's runtime loads the stored version the way the anomaly@1 node does and scores like predict().
    loaded = LoadedModel("surface", tmp_path / "m" / "1", RuntimeOptions("CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
    image = cv2.cvtColor(brick_crop(256, np.random.default_rng(9)), cv2.COLOR_GRAY2BGR)
    result = loaded.infer(image[None])
    request = compile_f32(model).create_infer_request()
    score, anomaly_map = predict(request, image)
    assert float(result["pred_score"][0]) == pytest.approx(score, rel=1e-4)
    assert float(anomaly_map.max()) == pytest.approx(score, rel=1e-6)


def test_compiled_model_is_pinned_to_f32(brick_model: TrainedAnomaly) -> None:
    compiled = compile_f32(brick_model.model)
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def test_held_out_good_crops_pass_and_a_hole_is_flagged_where_it_is(brick_model: TrainedAnomaly,
                                                                    brick_request: ov.InferRequest) -> None:
    rng = np.random.default_rng(11)
    good_scores = [predict(brick_request, brick_crop(256, rng))[0] for _ in range(10)]
    assert sum(score < brick_model.threshold for score in good_scores) >= 8, (good_scores, brick_model.threshold)
    for _ in range(3):
        image, mask = add_defect(brick_crop(256, rng), "hole", rng)
        assert_flagged_where_it_is(brick_request, image, mask, brick_model.threshold)


def test_metrics_report_leave_out_scores_and_timings(brick_model: TrainedAnomaly) -> None:
    metrics = brick_model.metrics
    assert metrics["images"] == 10 and metrics["augmented_images"] == 80
    assert metrics["leave_out_scores"]["max"] < brick_model.threshold
    # Each training image's own leave-one-out score, as the console's histogram shows them.
    assert sorted(brick_model.leave_out_scores) == list(range(10))
    assert max(brick_model.leave_out_scores.values()) == pytest.approx(metrics["leave_out_scores"]["max"], abs=1e-4)
    assert metrics["train_seconds"] > 0 and set(metrics["timings"]) >= {"features", "coreset", "leave_out"}
    assert metrics["threshold_rule"].startswith("good-only")


def test_leave_out_maps_match_the_graph_when_nothing_is_left_out(backbone_xml: Path) -> None:
    # The thresholds come from maps computed in numpy; they must be the graph's maps, or the thresholds drift.
    backbone = ov.Core().read_model(backbone_xml)
    image = cv2.cvtColor(brick_crop(0, np.random.default_rng(5)), cv2.COLOR_GRAY2BGR)
    features_model = compile_f32(feature_model(backbone, 256))
    raw = features_model.create_infer_request().infer({0: image[None]})[0].reshape(1, FEATURE_CHANNELS, -1)
    rng = np.random.default_rng(0)
    entries = raw[0][:, rng.choice(raw.shape[2], 64, replace=False)].T.copy()
    scale = np.ones(66, np.float32)
    scale[-2:] = 0.1
    offset = np.zeros(66, np.float32)
    offset[-2:] = -3.0
    entries = entries * scale + offset
    bank = Bank(entries, local_radius2(entries), scale, offset, np.zeros(64, np.int32))
    expected = leave_out_maps(raw, bank, 256)[0]
    graph = compile_f32(scoring_model(backbone, 256, bank))
    score, anomaly_map = predict(graph, image)
    np.testing.assert_allclose(anomaly_map, expected, rtol=2e-3, atol=2e-3 * float(expected.max()))
    assert score == pytest.approx(float(expected.max()), rel=2e-3)


def test_validation_sets_choose_the_threshold_and_give_auroc(backbone_xml: Path) -> None:
    rng = np.random.default_rng(21)
    good = [brick_crop(0, rng) for _ in range(6)]
    val_good = [brick_crop(256, rng) for _ in range(6)]
    bad = [add_defect(brick_crop(256, rng), kind, rng) for kind in ("hole", "foreign", "stain", "hole")]
    trained = train_anomaly(good, backbone_xml, val_good=val_good, val_bad=[b for b, _ in bad],
                            val_bad_masks=[m for _, m in bad])
    metrics = trained.metrics
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] > 0.9
    assert metrics["threshold_rule"].startswith("validation")
    assert metrics["val_good_scores"]["max"] < trained.threshold < metrics["val_bad_scores"]["min"]
    assert 0 < trained.pixel_threshold <= trained.threshold


def test_demo_model_flags_every_bad_part_and_passes_fresh_good_ones(backbone_xml: Path) -> None:
    trained = train_anomaly(good_parts(12, seed=0), backbone_xml)
    request = compile_f32(trained.model).create_infer_request()
    bad_images, _ = bad_parts(6, seed=0)
    bad_scores = [predict(request, image)[0] for image in bad_images]
    assert min(bad_scores) > trained.threshold, (bad_scores, trained.threshold)
    fresh = [predict(request, image)[0] for image in good_parts(10, seed=1)]
    assert sum(score < trained.threshold for score in fresh) >= 9, (fresh, trained.threshold)


def test_command_line_trains_validates_and_stores(backbone_xml: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    write_demo_images(tmp_path / "images", n_good=6, n_bad=5, seed=4)
    (tmp_path / "val_good").mkdir()
    for index, image in enumerate(good_parts(3, seed=5)):
        cv2.imwrite(str(tmp_path / "val_good" / f"{index}.png"), image)
    out = tmp_path / "store" / "demo_anomaly"
    code = main(["--good", str(tmp_path / "images" / "good"), "--val-good", str(tmp_path / "val_good"),
                 "--val-bad", str(tmp_path / "images" / "bad"), "--val-masks", str(tmp_path / "images" / "masks"),
                 "--out", str(out), "--backbone", str(backbone_xml)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "trained in" in printed and "threshold" in printed
    assert "image AUROC" in printed and "pixel AUROC" in printed
    assert "wrote" in printed and read_current(out) == "1"
    spec = yaml.safe_load((out / "1" / "spec.yaml").read_text())
    assert spec["training"]["images"] == 6 and spec["training"]["metrics"]["val_bad"] == 5


def test_command_line_says_run_make_models_without_a_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("APPLIANCE_MODEL_STORE", str(tmp_path / "empty_store"))
    (tmp_path / "good").mkdir()
    assert main(["--good", str(tmp_path / "good"), "--out", str(tmp_path / "out")]) == 1
    assert "make models" in capsys.readouterr().err
    assert main(["--good", str(tmp_path / "good"), "--out", str(tmp_path / "out"), "--backbone",
                 str(tmp_path / "nope.xml")]) == 1
    assert "make models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auroc_of_hand_computed_cases() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.8, 0.9, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    # Pairs (bad, good): (.35, .1) win, (.35, .4) loss, (.8, .1) win, (.8, .4) win -> 3/4.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie between a good and a bad score counts one half: (.5, .5) 0.5, (.5, .2) 1, (.9, .5) 1, (.9, .2) 1.
    assert auroc([0.5, 0.5, 0.2, 0.9], [0, 1, 0, 1]) == pytest.approx(3.5 / 4)
    assert auroc([3, 3, 3, 3, 3], [1, 0, 1, 0, 0]) == pytest.approx(0.5)
    # Ties inside one class do not matter: 2 bad at .7, 3 good at .1, .7, .7 -> (1 + .5 + .5) * 2 / 6.
    assert auroc([0.7, 0.7, 0.1, 0.7, 0.7], [1, 1, 0, 0, 0]) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [0, 0])


def test_threshold_choosers_on_hand_computed_cases() -> None:
    assert youden_threshold([1, 2, 3], [5, 6]) == (4.0, 1.0)
    # Overlap: the best cut leaves one good above it (J = 1 - 1/4), in the widest gap among the best.
    threshold, youden = youden_threshold([1, 2, 3, 7], [5, 6, 8])
    assert youden == pytest.approx(0.75) and threshold == pytest.approx(4.0)
    threshold, f1 = f1_threshold(np.array([0.1, 0.2, 0.9, 0.8, 0.3]), np.array([0, 0, 1, 1, 0], bool))
    assert f1 == 1.0 and 0.3 < threshold < 0.8


def test_good_validation_images_alone_join_the_good_only_rule(backbone_xml: Path) -> None:
    rng = np.random.default_rng(31)
    val_good = [brick_crop(256, rng) for _ in range(4)]
    stages: list[str] = []
    trained = train_anomaly([brick_crop(0, rng) for _ in range(4)], backbone_xml, val_good=val_good,
                            progress=stages.append)
    assert stages == list(STAGES)
    assert trained.metrics["threshold_rule"].endswith("and validation good scores")
    assert trained.threshold > trained.metrics["val_good_scores"]["max"]
    assert trained.pixel_threshold == trained.threshold and "image_auroc" not in trained.metrics
