"""The settings of every node type: what a flow file may say about a node, and nothing else.

Apart from the node implementations (one module per type beside this one) so that loading and checking a
project's configuration imports neither OpenCV nor OpenVINO: the flow loader validates against these models,
the implementations are imported when a flow is built (the registry in __init__.py). docs/nodes.md is
generated from the field descriptions here (`python -m appliance.nodes.docs`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from appliance.nodes.base import DeviceSettings, ModelNodeSettings, NodeSettings, OverridableSettings
from appliance.runtime.spec import DecoderName

COLOR_PATTERN = r"^#[0-9a-fA-F]{6}$"
# identify@1 and face enrolment (faces_gallery.py) share these.
DEFAULT_GALLERY = "gallery"
DEFAULT_DESCRIPTOR_MODEL = "face_descriptor"
MAX_REC_WIDTH = 2048  # a 42:1 line; wider boxes are squeezed (and are rarely one line of text)


class _Part(BaseModel):
    """A part of a node's settings (a rule, a rectangle): unknown keys are errors too."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------------------
# Pre-processing


class CropSettings(NodeSettings):
    """Keep a rectangular region of interest; rectangles found after it still refer to the input frame."""

    type: Literal["crop@1"]
    x: NonNegativeInt = Field(description="left edge, pixels of the node's image")
    y: NonNegativeInt = Field(description="top edge, pixels of the node's image")
    width: PositiveInt = Field(description="pixels")
    height: PositiveInt = Field(description="pixels")
    # A fixed camera sometimes delivers a smaller frame (binning, a misconfigured ROI on the camera): by
    # default that is a flow error, or the part could pass uninspected; `clip` keeps what overlaps.
    outside: Literal["error", "clip"] = Field("error", description="a region that leaves the image: a node "
                                              "error, or `clip` it to what overlaps")


class ResizeSettings(NodeSettings):
    """Scale the image; give `width` and/or `height` (one alone keeps the aspect ratio), or `scale`."""

    type: Literal["resize@1"]
    width: PositiveInt | None = Field(None, description="pixels")
    height: PositiveInt | None = Field(None, description="pixels")
    scale: PositiveFloat | None = Field(None, description="factor for both sides, instead of width and height")

    @model_validator(mode="after")
    def _one_way(self) -> ResizeSettings:
        if (self.scale is None) == (self.width is None and self.height is None):
            raise ValueError("give either scale, or width and/or height (one missing side keeps the aspect ratio)")
        return self


class RotateSettings(NodeSettings):
    """Rotate the image; multiples of 90 degrees are exact (no interpolation)."""

    type: Literal["rotate@1"]
    angle: float = Field(description="degrees, counter-clockwise")
    expand: bool = Field(True, description="grow the canvas so that no corner is cut off (other angles than "
                         "multiples of 90), else keep the image's size")
    fill: tuple[int, int, int] = Field((0, 0, 0), description="BGR colour of the uncovered corners")


class FlipSettings(NodeSettings):
    """Mirror the image."""

    type: Literal["flip@1"]
    direction: Literal["horizontal", "vertical", "both"] = Field(description="horizontal: left-right")


class ColorSettings(NodeSettings):
    """Convert the image to gray or to BGR."""

    type: Literal["color@1"]
    to: Literal["gray", "bgr"] = Field(description="the colour mode of the images after the node")


class MaskRectangle(_Part):
    """A rectangle in pixels of the node's image."""

    x: NonNegativeInt
    y: NonNegativeInt
    width: PositiveInt
    height: PositiveInt


class MaskSettings(NodeSettings):
    """Paint over regions of the image (or over everything but them) before the nodes that follow."""

    type: Literal["mask@1"]
    rectangles: list[MaskRectangle] = Field(default_factory=list, description="regions to paint over")
    polygons: list[Annotated[list[tuple[int, int]], Field(min_length=3)]] = Field(
        default_factory=list, description="regions to paint over, each a list of at least 3 [x, y] points")
    fill: tuple[int, int, int] = Field((0, 0, 0), description="BGR colour painted")
    invert: bool = Field(False, description="keep only what is inside the shapes, paint over the rest")


class CodeSettings(NodeSettings):
    """Run a function of yours on the context: a Code hook (README, "Projects and flows")."""

    type: Literal["code@1"]
    module: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="file <module>.py in the project's code "
                        "folder")
    function: str = Field("main", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the function called with "
                          "the context and `form`")
    form: dict[str, Any] = Field(default_factory=dict, description="settings passed as the hook's second argument")
    on_error: Literal["fail", "continue"] = Field("fail", description="what a hook's exception does: fail the "
                                                  "branch, or continue with the next node")
    timeout_s: PositiveFloat | None = Field(None, description="seconds a call may take; null: the project's "
                                            "`limits.hook_timeout_s`")


# ---------------------------------------------------------------------------------------------------------
# Evaluation


class NoRectangles(_Part):
    """No rectangle (of `label`, or of any label) is present."""

    rule: Literal["no_rectangles"]
    label: str | None = Field(None, description="count only rectangles of this label")


class MaxRectangles(_Part):
    """At most `count` rectangles (of `label`, or of any label)."""

    rule: Literal["max_rectangles"]
    count: NonNegativeInt
    label: str | None = Field(None, description="count only rectangles of this label")


class MinRectangles(_Part):
    """At least `count` rectangles (of `label`, or of any label)."""

    rule: Literal["min_rectangles"]
    count: NonNegativeInt
    label: str | None = Field(None, description="count only rectangles of this label")


class ScoreBelow(_Part):
    """`context["score"]` is below `threshold`, or below `context["threshold"]` (set by anomaly@1) when none is
    given."""

    rule: Literal["score_below"]
    threshold: float | None = None


class TopClass(_Part):
    """The best label predicted by a classify@1 node (the last one, or `node`) is one of `labels`."""

    rule: Literal["top_class"]
    labels: list[str] = Field(min_length=1)
    node: str | None = Field(None, description="the classify@1 node's id; null: the last one that ran")


class KeyEquals(_Part):
    """`context[key] == value`, for keys set by hooks or nodes (e.g. ocr@1's `ocr_match`)."""

    rule: Literal["key_equals"]
    key: str = Field(min_length=1)
    value: Any


Rule = Annotated[NoRectangles | MaxRectangles | MinRectangles | ScoreBelow | TopClass | KeyEquals,
                 Field(discriminator="rule")]


class EvaluateSettings(NodeSettings):
    """Set `result` (OK/NG) from rules over the context; every rule must pass. Each outcome is listed in
    `evaluation` with its reason, so an operator sees why a part was NG."""

    type: Literal["evaluate@1"]
    rules: list[Rule] = Field(min_length=1, description="each a mapping with `rule` and its settings (below)")


# ---------------------------------------------------------------------------------------------------------
# Models


class AnomalySettings(ModelNodeSettings):
    """An anomaly model on the image (or the ROI before it): `score`, `threshold`, a heat map, and `UNSUPERVISED`
    rectangles around anomalous regions. Runs models trained by `appliance train anomaly` and anomalib's OpenVINO
    exports (`pred_score`, `anomaly_map`)."""

    type: Literal["anomaly@1"]
    override_ranges: ClassVar[dict[str, tuple[float, float]]] = {"threshold": (1e-6, 1e6)}
    threshold: PositiveFloat | None = Field(None, description="image score at or above which the part is anomalous "
                                            "(`score_below` in evaluate@1 uses it); null: the model's")
    pixel_threshold: PositiveFloat | None = Field(None, description="map value above which a pixel belongs to a "
                                                  "region; a region is reported when it reaches `threshold` "
                                                  "somewhere; null: the model's, else `threshold`")
    min_area: NonNegativeInt = Field(16, description="smallest region reported, in pixels of the node's image")
    label: str = Field("anomaly", description="of the rectangles")
    color: str = Field("#ff0000", pattern=COLOR_PATTERN, description="of the rectangles")


class ClassifySettings(ModelNodeSettings):
    """The top labels of a classification model. Exclusive labels (`exclusive: true` in the spec) get softmax
    scores, multi-label models a sigmoid per label, unless the outputs already are probabilities. A request's
    `threshold` (or `min_confidence`) replaces every threshold of the node; `max_labels` replaces
    `max_predictions`."""

    type: Literal["classify@1"]
    threshold: float = Field(0.5, ge=0, le=1, description="score a label needs to be predicted")
    thresholds: dict[str, float] = Field(default_factory=dict, description="per label name, instead of threshold "
                                         "(checked against the model's labels)")
    max_predictions: PositiveInt = Field(5, description="predicted (and discarded) labels listed at most")
    show_discarded: bool = Field(False, description="also list the best labels under their threshold")
    fit: Literal["stretch", "center_crop"] = Field(
        "stretch", description="stretch: the whole image to the model's input; center_crop: the largest centred "
                               "square first, as ImageNet models were evaluated (the image's edges are not seen)")
    activation: Literal["auto", "softmax", "sigmoid", "none"] = Field(
        "auto", description="auto: probabilities when the outputs already are (all in 0..1, summing to 1 for "
                            "exclusive labels), else softmax (exclusive) or sigmoid")
    only: list[int | str] = Field(default_factory=list, description="label ids or names this node may answer "
                                  "with; empty: all. Scores are not renormalised over them")


class SegmentSettings(ModelNodeSettings):
    """A per-pixel segmentation model (PEKAT's Surface Detector): per-class maps (1 x C x H x W probabilities or
    logits; C = 1 is one foreground class) or a map of class ids (1 x H x W integers). A pixel belongs to its
    best class when that class's probability reaches `threshold`; every connected region of a class other than
    `background` becomes a `SURFACE` rectangle with its label, `area` (input-frame pixels) and mean probability.
    The foreground probability is the heat map; `surfaceClasses` lists per class its `area` and `regions`."""

    type: Literal["segment@1"]
    threshold: float = Field(0.5, ge=0, le=1, description="probability a pixel needs to belong to a class")
    min_area: NonNegativeInt = Field(16, description="smallest region reported, in pixels of the node's image")
    background: int | None = Field(0, description="class id that is not a region (null: every class is)")
    max_labels: int = Field(100, ge=1, description="regions reported at most, the largest first")
    activation: Literal["auto", "softmax", "sigmoid", "none"] = Field(
        "auto", description="auto: probabilities when the maps already are (all in 0..1), else softmax over "
                            "classes (sigmoid for C = 1)")


class DetectionSettings(ModelNodeSettings):
    """What every node built on a detection model sets (detect@1, faces@1)."""

    decoder: DecoderName | None = Field(None, description="output layout instead of the spec's outputs.decoder")
    confidence: float | None = Field(None, ge=0, le=1, description="score a box needs (a score of exactly 0 is "
                                     "never a box); null: the spec's threshold, else 0.5")
    iou: float | None = Field(None, gt=0, le=1, description="overlap above which NMS keeps only the better of two "
                              "boxes; null: 0.3 for blazeface, else 0.45")
    max_labels: int = Field(100, ge=1, le=1000, description="boxes kept at most, the best first")
    fit: Literal["auto", "stretch", "letterbox"] = Field(
        "auto", description="how the image meets the model input: stretched, or scaled whole with black borders "
                            "(aspect kept); auto: letterbox for yolo, yolo_transposed and blazeface, else stretch")
    nms: Literal["auto", "hard", "weighted"] = Field(
        "auto", description="weighted (MediaPipe's): a kept box becomes the score-weighted mean of those it "
                            "suppressed; auto: weighted for blazeface, hard otherwise")


class DetectSettings(DetectionSettings):
    """Boxes from an object detection model as `DETECTION` rectangles, with the label's name (in the request's
    `lang`) and colour from the model's spec. A request's `threshold` (or `min_confidence`) replaces
    `confidence`, and `max_labels` replaces `max_labels`, where `overrides` lists them."""

    type: Literal["detect@1"]
    labels: list[str] | None = Field(None, description="label names to keep (the spec's default names, checked "
                                     "against the model's labels); null: every label")
    class_agnostic: bool = Field(False, description="suppress overlapping boxes whatever their class (by default "
                                 "NMS runs per class)")


class FacesSettings(DetectionSettings):
    """Faces found by BlazeFace (`face_short` or `face_full`, `task: faces`), decoded and selected as in detect@1,
    then anonymised in the image that follows the node. Each face region (the face box grown by `margin`) is a
    `DETECTION` rectangle labelled `face`, and each face is listed in `faces` for the nodes that follow: `node`,
    `box`, `score` and `keypoints` (BlazeFace's 6 points), in input-frame pixels."""

    type: Literal["faces@1"]
    mode: Literal["pixel", "fill", "black", "box", "none"] = Field(
        "pixel", description="how the faces are anonymised: pixel: blocks of `block` pixels, each the mean of its "
                             "pixels; fill: painted with `color`; black: everything but the faces black; box: "
                             "framed with `color`, not hidden; none: not at all (detection only)")
    block: PositiveInt | None = Field(None, description="pixel mode: block side in pixels; null: an eighth of the "
                                      "region's width (at least 4), so every face is about 8 blocks wide")
    color: str | None = Field(None, pattern=COLOR_PATTERN, description="fill colour (fill, default #000000) or "
                              "frame colour (box, default the label's colour); gray images get its luminance")
    thickness: PositiveInt = Field(2, description="box mode: line width in pixels, drawn inside the region")
    margin: float = Field(0.1, ge=0, le=2, description="added on each side of the face box, as a fraction of "
                          "its width (left, right) and height (top, bottom): BlazeFace boxes end at the "
                          "forehead and the chin")


class IdentifySettings(ModelNodeSettings):
    """Who each face in `faces` (a faces@1 node before this one) is, against the project's gallery: dlib's
    128-D descriptor of a 150x150 chip aligned on BlazeFace's eyes and mouth, and the nearest enrolled one."""

    type: Literal["identify@1"]
    override_ranges: ClassVar[dict[str, tuple[float, float]]] = {}  # nothing a request could change here
    model: str = Field(DEFAULT_DESCRIPTOR_MODEL, min_length=1, description="store name of a `features` model "
                       "taking square face chips")
    gallery: str = Field(DEFAULT_GALLERY, min_length=1, description="folder of enrolled people, relative to the "
                         "project folder: one <name>.npy (N x 128 descriptors) per person")
    # dlib's network was trained so that one person's descriptors lie within 0.6 of each other; 0.6 is where
    # bench/identity_quality.py measured no false accept on its set (docs/models.md).
    max_distance: float = Field(0.6, gt=0, le=2, description="largest euclidean distance to an enrolled "
                                "descriptor that still names the person")


class DemographicsSettings(DeviceSettings):
    """Age and gender of every face in `faces` (a faces@1 node before this one), from dlib's age predictor and
    gender classifier on 64x64 and 32x32 face chips aligned as identify@1's are."""

    type: Literal["demographics@1"]
    age_model: str = Field("age", min_length=1, description="age network in the project's store (81 classes); "
                           "`check` refuses a model that is not a demographics model of that role")
    gender_model: str = Field("gender", min_length=1, description="gender network in the project's store")


class OcrSettings(DeviceSettings, OverridableSettings):
    """Text lines read by a text detector and a recogniser (PP-OCRv4, `make models`): one rotated box per text
    region of the detector's probability map, each cut out upright, optionally turned by the angle classifier,
    and read with greedy CTC decoding. Overrides: `threshold` replaces the box threshold, `min_confidence` the
    text one, `max_labels` the lines kept."""

    type: Literal["ocr@1"]
    det_model: str = Field("ocr_det", min_length=1, description="text detector (DB) in the project's store")
    rec_model: str = Field("ocr_rec", min_length=1, description="text recogniser (CTC) in the project's store")
    cls_model: str = Field("ocr_cls", min_length=1, description="0/180 degree line classifier, with angle_classifier")
    angle_classifier: bool = Field(False, description="turn lines the classifier finds upside down (about 1 ms a "
                                   "line)")
    shapes: Literal["auto", "dynamic", "static"] = Field(
        "auto", description="dynamic: the detector sees the image at its aspect ratio and lines are read at their "
                            "own length (CPU, GPU); static: the image letterboxed into a det_limit square, each "
                            "line read at rec_width (what an NPU needs); auto: static where the firmware "
                            "profile has static_shapes (the NPU)")
    det_limit: int = Field(736, ge=32, le=4096, description="longer side of the image as the detector sees it "
                           "(multiples of 32; small images are enlarged)")
    rec_width: int = Field(320, ge=48, le=MAX_REC_WIDTH, description="static: width every line is read at; "
                           "dynamic: the least width (lines are padded to it)")
    text_threshold: float = Field(0.3, gt=0, lt=1, description="probability above which a pixel is text")
    threshold: float = Field(0.5, ge=0, le=1, description="mean text probability a box needs")
    unclip_ratio: float = Field(1.6, gt=0, le=5, description="growth of each box on every side: area * ratio / "
                                "perimeter (DB's shrunk kernels)")
    crop_margin: float = Field(0.25, ge=0, le=1, description="background read above and below each box, "
                               "in line heights (the reported box stays DB's)")
    min_confidence: float = Field(0.5, ge=0, le=1, description="mean probability of a line's characters needed to "
                                  "keep it")
    space_threshold: float = Field(0.2, gt=0, le=1, description="probability of the space class between two "
                                   "words at which a space is read although blank wins (1: plain greedy)")
    cls_threshold: float = Field(0.9, gt=0.5, le=1, description="probability of 180 degrees that turns a line")
    max_labels: PositiveInt = Field(50, le=1000, description="lines kept at most (the most confident)")
    expected: str | None = Field(None, min_length=1, description="Python regular expression a line or the whole "
                                 "text must match in full; else `ocr_match` is false and the result NG")
    color: str = Field("#00c0ff", pattern=COLOR_PATTERN, description="of the rectangles")
