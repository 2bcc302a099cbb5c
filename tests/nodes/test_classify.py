"""classify@1 on a colour classifier built here (known scores), and on the real EfficientNet-lite0 ImageNet model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import openvino as ov
import pytest
import requests
import yaml
from openvino import opset13 as ops
from skimage import data

from appliance.runtime.store import switch_current, write_manifest
from tests.conftest import REPO, Server, start_server, write_project

LABELS = [{"id": 0, "name": "red", "color": "#ff0000", "names": {"de": "rot", "cs": "červená"}},
          {"id": 1, "name": "green", "color": "#00ff00", "names": {"de": "grün"}},
          {"id": 2, "name": "blue", "names": {"de": "blau"}}]


def save_colour_classifier(store: Path, name: str, exclusive: bool) -> None:
    """Logits = 10 x (mean of each RGB channel in [0, 1] - 0.5): a pure red frame scores red 5, green and blue -5."""
    image = ops.parameter([1, 3, 16, 16], ov.Type.f32, name="input")
    means = ops.reduce_mean(image, ops.constant(np.array([2, 3])), keep_dims=False)
    logits = ops.multiply(ops.subtract(means, ops.constant(np.float32(0.5))), ops.constant(np.float32(10)))
    logits.output(0).set_names({"logits"})
    version_dir = store / name / "1"
    version_dir.mkdir(parents=True)
    ov.save_model(ov.Model([logits], [image], name), version_dir / "model.xml")
    spec = {"task": "classify", "exclusive": exclusive, "labels": LABELS,
            "input": {"size": [16, 16], "element_type": "f32", "layout": "NCHW", "colour_order": "RGB",
                      "scale": 1 / 255}}
    (version_dir / "spec.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    write_manifest(version_dir)
    switch_current(store / name, "1")


def frame(bgr: tuple[int, int, int]) -> bytes:
    return cv2.imencode(".png", np.full((60, 80, 3), bgr, np.uint8))[1].tobytes()


RED, YELLOW, GREY = (0, 0, 255), (0, 255, 255), (128, 128, 128)


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    flow = {"nodes": {
        "exclusive": {"type": "classify@1", "model": "one_colour", "threshold": 0.6, "max_predictions": 2,
                      "show_discarded": True, "overrides": ["threshold", "max_labels"], "next": ["verdict"]},
        "verdict": {"type": "evaluate@1", "rules": [{"rule": "top_class", "labels": ["red"]}]},
    }}
    project = write_project(tmp_path_factory.mktemp("classify") / "p", flow)
    save_colour_classifier(project / "models", "one_colour", exclusive=True)
    server = start_server(project)
    yield server
    server.stop()


def classify(server: Server, body: bytes, query: str = "") -> dict:
    response = requests.post(f"{server.url}/analyze_image{query}", data=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_exclusive_labels_are_softmax_scores_and_the_top_class_drives_the_verdict(colours: Server) -> None:
    ctx = classify(colours, frame(RED))
    # softmax of (5, -5, -5): 1 / (1 + 2 e^-10)
    top = 1 / (1 + 2 * np.exp(-10))
    assert ctx["classNames"] == [{"id": 0, "label": "red", "confidence": 100, "color": "#ff0000"}]
    (result,) = ctx["classification"]
    assert result["predicted"][0]["score"] == pytest.approx(top, abs=1e-5)
    assert [d["label_name"] for d in result["discarded"]] == ["green", "blue"]
    assert ctx["result"] is True
    assert ctx["models"] == [{"node": "exclusive", "model": "one_colour", "version": "1", "device": "CPU"}]


def test_nothing_over_the_threshold_is_ng_with_the_reason(colours: Server) -> None:
    ctx = classify(colours, frame(GREY))  # all three logits ~0: 1/3 each, under 0.6
    assert ctx["classNames"] == [] and ctx["result"] is False
    assert ctx["evaluation"][0]["detail"] == "no label reached its threshold"
    assert len(ctx["classification"][0]["discarded"]) == 2  # max_predictions also bounds the discarded


def test_lang_picks_label_names_and_falls_back_to_the_default(colours: Server) -> None:
    assert classify(colours, frame(RED), "?lang=de")["classNames"][0]["label"] == "rot"
    assert classify(colours, frame(RED), "?lang=cs")["classNames"][0]["label"] == "červená"
    assert classify(colours, frame(RED), "?lang=de-AT")["classNames"][0]["label"] == "rot"
    assert classify(colours, frame(RED), "?lang=fr")["classNames"][0]["label"] == "red"


def test_request_overrides_where_the_flow_allows_them(colours: Server) -> None:
    ctx = classify(colours, frame(GREY), "?threshold=0.3&max_labels=3")
    assert [c["label"] for c in ctx["classNames"]] == ["red", "green", "blue"]
    assert ctx["classification"][0]["predicted"][0]["threshold"] == 0.3


@pytest.mark.parametrize(("query", "message"), [
    ("?threshold=1.5", "threshold must be a number from 0 to 1, got '1.5'"),
    ("?threshold=abc", "threshold must be a number from 0 to 1, got 'abc'"),
    ("?max_labels=0", "max_labels must be a whole number from 1 to 1000, got '0'"),
    ("?max_labels=2.5", "max_labels must be a whole number from 1 to 1000, got '2.5'"),
    ("?min_confidence=0.2", "min_confidence cannot be set by a request in this project: no node of its flow "
                            "lists it in `overrides`"),
    ("?lang=de_DE!", "lang must be a language code such as en or de-AT, got 'de_DE!'"),
])
def test_bad_or_forbidden_overrides_are_400(colours: Server, query: str, message: str) -> None:
    response = requests.post(f"{colours.url}/analyze_image{query}", data=frame(RED))
    assert response.status_code == 400
    assert response.json() == {"status": 400, "message": message, "data": None}


def test_multi_label_models_score_each_label_with_a_sigmoid(tmp_path: Path) -> None:
    flow = {"nodes": {"labels": {"type": "classify@1", "model": "colours", "threshold": 0.9,
                                 "thresholds": {"green": 0.999}, "show_discarded": True}}}
    project = write_project(tmp_path / "p", flow)
    save_colour_classifier(project / "models", "colours", exclusive=False)
    server = start_server(project)
    try:
        ctx = classify(server, frame(YELLOW))  # logits (5, 5, -5): sigmoid 0.9933, 0.9933, 0.0067
        predicted = ctx["classification"][0]["predicted"]
        assert [(p["label_name"], round(p["score"], 4)) for p in predicted] == [("red", 0.9933)]
        discarded = {d["label_name"]: d for d in ctx["classification"][0]["discarded"]}
        assert discarded["green"]["threshold"] == 0.999 and round(discarded["green"]["score"], 4) == 0.9933
        assert ctx["result"] is True  # no evaluation: the flow passes
    finally:
        server.stop()


def test_check_names_a_threshold_for_an_unknown_label(tmp_path: Path) -> None:
    from appliance.errors import ConfigError
    from appliance.project import Project

    project = write_project(tmp_path / "p", {"nodes": {"c": {"type": "classify@1", "model": "one",
                                                             "thresholds": {"purple": 0.5}}}})
    save_colour_classifier(project / "models", "one", exclusive=True)
    with pytest.raises(ConfigError, match="model 'one' has no label 'purple'"):
        Project.load(project)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_file = tmp_path_factory.mktemp("imagenet") / "server.log"
    server = start_server(REPO / "projects" / "classify-objects", log_file=log_file)
    yield server
    server.stop()


def rgb_png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_demo_project_recognises_coffee_and_a_cat_with_the_real_model(imagenet: Server) -> None:
    coffee = classify(imagenet, rgb_png(data.coffee()))
    assert coffee["result"] is True
    assert coffee["classNames"][0]["label"] == "espresso" and coffee["classNames"][0]["confidence"] >= 90
    cat = classify(imagenet, rgb_png(data.chelsea()))
    assert cat["result"] is False
    assert {c["label"] for c in cat["classNames"]} <= {"tiger cat", "tabby", "Egyptian cat"}
    assert len(cat["classNames"]) >= 2


def test_only_keeps_the_listed_labels_with_their_unrenormalised_scores(tmp_path: Path) -> None:
    flow = {"nodes": {"c": {"type": "classify@1", "model": "one", "threshold": 0.0, "only": ["green", 2],
                            "show_discarded": True}}}
    project = write_project(tmp_path / "p", flow)
    save_colour_classifier(project / "models", "one", exclusive=True)
    server = start_server(project)
    try:
        ctx = classify(server, frame(YELLOW))  # logits (5, 5, -5): softmax 0.49998, 0.49998, 0.00005
        predicted = ctx["classification"][0]["predicted"]
        assert [(p["label_name"], round(p["score"], 4)) for p in predicted] == [("green", 0.5), ("blue", 0.0)]
    finally:
        server.stop()


def test_check_names_an_only_label_the_model_lacks(tmp_path: Path) -> None:
    from appliance.errors import ConfigError
    from appliance.project import Project

    project = write_project(tmp_path / "p", {"nodes": {"c": {"type": "classify@1", "model": "one",
                                                             "only": ["red", "purple", 7]}}})
    save_colour_classifier(project / "models", "one", exclusive=True)
    with pytest.raises(ConfigError, match="model 'one' has no label 'purple'") as caught:
        Project.load(project)
    assert any("has no label 7" in problem for problem in caught.value.problems)
