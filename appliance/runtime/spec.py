"""spec.yaml: what a stored model expects and returns, typed per task, checked when written and when read.

Every key of a spec has a field here (`extra="forbid"`): a misspelt key is an error with its place
(`models/parts/3/spec.yaml:12:3 outputs.scroe: unknown key (did you mean 'score'?)`), never a value silently
ignored. `task` chooses the spec's class and so what `outputs` holds:

| task | class | `outputs` |
|---|---|---|
| anomaly | `AnomalySpec` | the score and map tensors (`pred_score`, `anomaly_map`, as anomalib exports them) |
| classify, features, segment | `ClassifySpec`, `FeaturesSpec`, `SegmentSpec` | a description of each output tensor |
| detect, faces | `DetectSpec` | the decoder of the boxes and the tensors it reads (nodes/detect.py) |
| ocr | `OcrSpec` | the role (detector, recogniser, angle classifier) and its decoding |
| demographics | `DemographicsSpec` | the role (age, gender) and its probabilities |

Provenance (licence, source wheel, converter, training record) is typed too: it is what an integrator reads to
know where a model came from. Nodes read these fields; none reads a raw dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, TypeAdapter, ValidationError

from appliance.config.source import Problem, YamlDocument, parse_yaml, validation_problems
from appliance.runtime.errors import StoreError

SPEC_FILE = "spec.yaml"


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(SpecModel):
    """The network's input; the runtime converts the u8 NHWC BGR frame to it in the graph (runtime/models.py)."""

    name: str | None = None
    size: tuple[int, int] = Field(description="height, width")
    size_order: Literal["height, width"] | None = Field(default=None, description="a reminder for readers of the file")
    element_type: Literal["u8", "f32"] = "u8"
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    colour_order: Literal["BGR", "RGB"] = "BGR"
    # f32 inputs: value = (pixel * scale - mean) / std, per channel in the model's colour order.
    scale: float = 1.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # Face models: the padding of the face chip they were trained on, as dlib's get_face_chip_details takes it.
    chip_padding: NonNegativeFloat | None = None
    normalisation: str | None = Field(default=None, description="what the graph does to the input, for readers")
    preprocessing_note: str | None = Field(default=None, description="how the model's authors prepared images, "
                                           "for readers")


class LabelSpec(SpecModel):
    id: int
    name: str
    color: str | None = Field(default=None, pattern=r"^#[0-9a-fA-F]{6}$")
    names: dict[str, str] = Field(default_factory=dict, description="the name per language code")


class TensorOutput(SpecModel):
    """One output tensor, described for readers (the nodes take the model's first output)."""

    name: str
    shape: list[int] | None = None
    note: str | None = None


class Tap(SpecModel):
    """An intermediate tensor of a backbone that feature extractors may read (training/features.py)."""

    name: str
    channels: PositiveInt
    stride: PositiveInt


class WheelSource(SpecModel):
    """The pinned wheel a pretrained network (or its labels) came from (supply/model_supply.py)."""

    package: str
    version: str
    wheel: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    member: str | None = None
    member_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class TrainingSource(SpecModel):
    """The images a model trained on this machine learnt from (`appliance train`, the console)."""

    good: str | None = Field(default=None, description="the folder of good images")
    good_images: list[str] = Field(default_factory=list, description="their file names")
    bad_images: list[str] = Field(default_factory=list, description="defective images that chose the threshold")
    console: str | None = Field(default=None, description="the console session that taught it")


class TrainingRecord(SpecModel):
    """What training measured (training/export.py); read by people and the console, never by the runtime."""

    images: int | None = None
    seconds: float | None = None
    backbone: str | None = Field(default=None, description="store name/version of the backbone the features came from")
    recipe: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict, description="timings, leave-one-out and validation "
                                    "figures, as training reports them")


class ModelSpec(SpecModel):
    """What every spec says, whatever its task; `read_spec` returns one of the task classes below."""

    name: str | None = Field(default=None, description="the store name it was written for")
    version: str | None = None
    task: str
    input: InputSpec
    labels: list[LabelSpec] = Field(default_factory=list)
    exclusive: bool = Field(default=True, description="one label per image (softmax), else one score per label")
    boxes: bool = False
    threshold: float | None = Field(default=None, description="the model's own decision threshold: an image score "
                                    "(anomaly) or a box confidence (detect, faces)")
    # The precision a model needs whatever the profile says (OpenVINO's INFERENCE_PRECISION_HINT), for models
    # whose outputs move under bf16 or f16 (APIS.md 3: bf16 moves the age probabilities by 1.3e-2).
    precision: Literal["f32", "f16", "bf16"] | None = None
    weights_precision: Literal["f32", "f16"] | None = None
    licence: str | None = None
    source: WheelSource | TrainingSource | None = None
    labels_source: WheelSource | None = None
    converter: str | None = Field(default=None, description="the function that built the network, or 'none: ...'")
    training: TrainingRecord | None = None


class AnomalyOutputs(SpecModel):
    score: str = Field(default="pred_score", description="the image score tensor ([1])")
    map: str = Field(default="anomaly_map", description="the anomaly map tensor (1 x 1 x H x W)")


class AnomalySpec(ModelSpec):
    task: Literal["anomaly"]
    outputs: AnomalyOutputs = AnomalyOutputs()
    pixel_threshold: float | None = Field(default=None, description="map value above which a pixel is anomalous")


class ClassifySpec(ModelSpec):
    task: Literal["classify"]
    outputs: list[TensorOutput] = Field(default_factory=list)
    taps: list[Tap] = Field(default_factory=list)


class FeaturesSpec(ModelSpec):
    task: Literal["features"]
    outputs: list[TensorOutput] = Field(default_factory=list)
    taps: list[Tap] = Field(default_factory=list)
    distance_threshold: float | None = Field(default=None, description="descriptors closer than this are the same "
                                             "(dlib's face descriptor: 0.6)")


class SegmentSpec(ModelSpec):
    task: Literal["segment"]
    outputs: list[TensorOutput] = Field(default_factory=list)
    activation: Literal["softmax", "sigmoid", "none"] | None = Field(
        default=None, description="what turns the first output (1 x C x H x W) into probabilities: `none` (it holds "
        "them), `softmax` (logits, one class per pixel), `sigmoid` (logits of one class); unset: segment@1 decides "
        "per frame from the values, in Python")


DecoderName = Literal["ssd", "yolo", "yolo_transposed", "separate", "blazeface"]
DECODERS: tuple[str, ...] = DecoderName.__args__  # type: ignore[attr-defined]
BoxFormat = Literal["xyxy", "yxyx", "xywh", "cxcywh"]
BOX_FORMATS: tuple[str, ...] = BoxFormat.__args__  # type: ignore[attr-defined]


class Anchors(SpecModel):
    """BlazeFace's anchor grid: one layer per stride, consecutive layers of one stride sharing a grid."""

    strides: list[PositiveInt] = Field(default_factory=list)
    offset: float = 0.5


class DetectOutputs(SpecModel):
    """How detect@1 and faces@1 read the boxes (docs/nodes.md, detect@1): the decoder and the tensors it takes;
    a tensor not named here is looked up by the key itself (an output called `boxes`)."""

    decoder: DecoderName | None = Field(default=None, description="none: the node's `decoder` setting must say")
    output: str | None = Field(default=None, description="ssd, yolo: the one output (default: the only one)")
    boxes: str | None = None
    scores: str | None = None
    labels: str | None = Field(default=None, description="separate: class ids per box (optional)")
    box_format: BoxFormat = "xyxy"
    normalized: bool = Field(default=True, description="separate: boxes as fractions of the input, else input pixels")
    anchors: Anchors | None = None


class DetectSpec(ModelSpec):
    task: Literal["detect", "faces"]
    outputs: DetectOutputs = DetectOutputs()


class OcrDetectorOutputs(SpecModel):
    role: Literal["detector"]
    decoder: Literal["db"] = "db"


class OcrRecogniserOutputs(SpecModel):
    role: Literal["recogniser"]
    decoder: Literal["ctc"] = "ctc"
    alphabet: str | None = Field(default=None, description="where the CTC labels are (ocr@1 reads the ONNX metadata)")


class OcrClassifierOutputs(SpecModel):
    role: Literal["angle classifier"]
    angles: list[int] = Field(default_factory=lambda: [0, 180])


OcrRole = Literal["detector", "recogniser", "angle classifier"]


class OcrSpec(ModelSpec):
    task: Literal["ocr"]
    outputs: Annotated[OcrDetectorOutputs | OcrRecogniserOutputs | OcrClassifierOutputs, Field(discriminator="role")]


class AgeOutputs(SpecModel):
    role: Literal["age"]
    probabilities: str | None = Field(default=None, description="the probabilities tensor (default: the first output)")
    age_weights: list[float] = Field(default_factory=lambda: [0.25, *range(1, 81)],
                                     description="the age of each class: age = sum(p * age_weights)")
    note: str | None = None


class GenderOutputs(SpecModel):
    role: Literal["gender"]
    probabilities: str | None = Field(default=None, description="the probabilities tensor (default: the first output)")
    note: str | None = None


class DemographicsSpec(ModelSpec):
    task: Literal["demographics"]
    outputs: Annotated[AgeOutputs | GenderOutputs, Field(discriminator="role")]


AnySpec = Annotated[AnomalySpec | ClassifySpec | FeaturesSpec | SegmentSpec | DetectSpec | OcrSpec | DemographicsSpec,
                    Field(discriminator="task")]
_ANY_SPEC: TypeAdapter[ModelSpec] = TypeAdapter(AnySpec)


def spec_tasks(kind: type[ModelSpec]) -> tuple[str, ...]:
    """The task names a spec class stands for: ("detect", "faces") for DetectSpec."""
    return tuple(kind.model_fields["task"].annotation.__args__)  # type: ignore[union-attr]


def _problems_text(problems: list[Problem]) -> str:
    return "; ".join(str(problem) for problem in problems)


def validate_spec(data: ModelSpec | dict[str, Any], where: str) -> ModelSpec:
    """A spec about to be written, typed (a dict is validated, a ModelSpec validated again as a dict, so a
    hand-built one cannot slip through); raises StoreError naming every problem, `where` first."""
    data = data.model_dump(mode="json", exclude_unset=True) if isinstance(data, ModelSpec) else dict(data)
    if data.get("outputs", "") is None:
        del data["outputs"]  # `outputs: None`: the task's defaults
    try:
        return _ANY_SPEC.validate_python(data)
    except ValidationError as error:
        # Not a file yet: problems name their key path, without lines.
        doc = YamlDocument(file=where, data=data)
        raise StoreError(f"spec not written: {_problems_text(validation_problems(doc, error, AnySpec))}") from None


def spec_text(spec: ModelSpec) -> str:
    """spec.yaml's text: the keys that were given (defaults stay in this module, not in every file), what the
    model is first (task, input, outputs), then the rest in the order of the fields above."""
    data = spec.model_dump(mode="json", exclude_unset=True)
    first = [key for key in ("name", "version", "task", "input", "outputs") if key in data]
    ordered = {key: data[key] for key in first} | {key: value for key, value in data.items() if key not in first}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)


def read_spec(version_dir: Path) -> ModelSpec:
    """The typed spec of a stored version; raises StoreError with `file:line:col path: message` for each problem."""
    path = version_dir / SPEC_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StoreError(f"{path}: cannot read ({error.strerror})") from None
    # libyaml first: the 1000-label ImageNet spec reads in 0.15 s instead of 0.9 s; the located (pure Python)
    # parser runs only to say where a problem is.
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict) and data.get("outputs", "") is None:
        del data["outputs"]  # `outputs: null`: the task's defaults
    try:
        return _ANY_SPEC.validate_python(data)
    except ValidationError as error:
        doc = parse_yaml(text, str(path))
        problems = list(doc.problems) or validation_problems(doc, error, AnySpec)
        raise StoreError(_problems_text(problems)) from None
