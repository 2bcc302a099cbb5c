"""ModelNode: what every node that runs a model of the project's store shares, so each keeps only its own
post-processing.

It checks the model through the store (`stored_spec`), prepares its slot, brings the node's image to the model
(`fit`: grey to BGR, the guard on images too small, stretch, centre crop or letterbox, and the mapping from model
pixels back to the image's), records model, version and device in `ctx["models"]`, and names labels (the
spec's, else "class N"). Where the backend resizes inside the graph (`input.any_size`, OpenVINO on CPU and GPU),
a BGR image goes to the model as it is; elsewhere (the NPU's static shapes, a remote model) the node resizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import (
    DeviceSettings,
    ModelNodeSettings,
    Node,
    NodeEnvironment,
    NodeError,
    Problems,
    stored_spec,
)
from appliance.runtime.compiled import CompiledModel, InputShape
from appliance.runtime.models import ModelSlot
from appliance.runtime.spec import LabelSpec, ModelSpec

Fit = str  # "stretch" | "center_crop" | "letterbox"


@dataclass(frozen=True)
class ModelInput:
    """The batch a model is given and how its pixels map back to the node's image, on pixel edges:
    image = (model - pad) * scale + origin."""

    batch: np.ndarray
    model_size: tuple[int, int]  # (height, width) the model sees
    scale: tuple[float, float]
    pad: tuple[float, float] = (0.0, 0.0)
    origin: tuple[float, float] = (0.0, 0.0)

    def to_image(self, map_height: int, map_width: int) -> np.ndarray:
        """3x3 matrix from the pixel centres of a map covering the model input (an anomaly or class map) to the
        pixel centres of the node's image."""
        model_h, model_w = self.model_size
        sx, sy = model_w / map_width * self.scale[0], model_h / map_height * self.scale[1]
        tx = 0.5 * sx - self.pad[0] * self.scale[0] + self.origin[0] - 0.5
        ty = 0.5 * sy - self.pad[1] * self.scale[1] + self.origin[1] - 0.5
        return np.array([[sx, 0, tx], [0, sy, ty], [0, 0, 1]])

    def points_to_image(self, points: np.ndarray) -> np.ndarray:
        """N x 2 points (x, y) in model pixels -> the node's image pixels (float32 or float64 as given; float64
        for integers)."""
        if points.dtype not in (np.float32, np.float64):
            points = points.astype(np.float64)
        if not points.size:
            return points.reshape(-1, 2)
        (scale_x, scale_y), (pad_x, pad_y), (origin_x, origin_y) = self.scale, self.pad, self.origin
        matrix = np.array([[scale_x, 0, origin_x - pad_x * scale_x], [0, scale_y, origin_y - pad_y * scale_y]])
        # numpy broadcasting over a last axis of 2 runs 2 values per inner loop: BlazeFace's 2304 anchors' 6
        # keypoints took 470 us that way, 10 us through OpenCV (measured here).
        return cv2.transform(np.ascontiguousarray(points).reshape(-1, 1, 2), matrix).reshape(-1, 2)


def bgr_or_grey(image: np.ndarray, min_side: int, model: str) -> np.ndarray:
    """The node's image when a model can take it (grey or BGR, at least ``min_side`` pixels a side), else a
    NodeError saying why."""
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise NodeError(f"needs a gray or BGR image, got shape {image.shape}")
    height, width = image.shape[:2]
    if height < min_side or width < min_side:
        raise NodeError(f"image {width}x{height} is too small for model '{model}'")
    return image


def _as_bgr(image: np.ndarray) -> np.ndarray:
    # Converted after the resize: at the model's size, a third of the bytes of a 1080p frame's conversion.
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def _halve_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """Whether `shrink` halves the image before its last resize: while it stays at least the new size, and,
    where the sizes are whole multiples of the new ones, while they stay whole multiples (the last step then
    still averages whole blocks: 1920x1080 to 192x108 is halved once, then 5 x 5 blocks)."""
    if width % new_w == 0 and height % new_h == 0:
        return (width // new_w) % 2 == 0 and (height // new_h) % 2 == 0
    return width // 2 >= new_w and height // 2 >= new_h


def shrink(image: np.ndarray, new_w: int, new_h: int) -> tuple[np.ndarray, int, int]:
    """The image at new_w x new_h with OpenCV (area when shrinking), and the width and height of it used. The
    trainers size their images with it too (appliance/training/images.py), so a model sees frames on the line as
    it saw them in training."""
    height, width = image.shape[:2]
    halvings = 0
    while _halve_first(width, height, new_w, new_h):
        # OpenCV's area resize has a vectorised path for exactly 2 x 2 only: 1280x720 halved twice and then
        # taken to 192x108 costs 0.8-1.0 ms of CPU, against 1.6-2.2 ms for a whole factor of 6 and then 213x120
        # to 192x108, and 4-8 ms for 1280x720 to 192x108 at once (bench/faces_path.py's frame, 2 loaded
        # cores). An odd last column or row is left out; the mapping back counts only the pixels used.
        width, height = width // 2, height // 2
        image = cv2.resize(image[:height * 2, :width * 2], (width, height), interpolation=cv2.INTER_AREA)
        halvings += 1
    used_w, used_h = width << halvings, height << halvings
    if (width, height) == (new_w, new_h):
        return image, used_w, used_h
    shrinking = width * height > new_w * new_h
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return resized, used_w, used_h


def fit_image(image: np.ndarray, input_size: tuple[int, int], fit: Fit, any_size: bool = False) -> ModelInput:
    """Bring a grey or BGR image to a model of ``input_size`` (height, width): stretched, the largest centred
    square stretched (`center_crop`), or scaled whole with black borders (`letterbox`). With ``any_size`` (the
    backend resizes linearly in the graph) a stretched BGR image goes as it is, and what the node still
    resizes it resizes linearly too, as the graph would."""
    origin = (0.0, 0.0)
    if fit == "center_crop":
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image, origin = image[top:top + side, left:left + side], (float(left), float(top))
    height, width = image.shape[:2]
    model_h, model_w = input_size
    if fit != "letterbox":
        if any_size and image.ndim == 3 and image.flags.c_contiguous:
            return ModelInput(image[None], input_size, (width / model_w, height / model_h), origin=origin)
        if any_size:
            resized = cv2.resize(image, (model_w, model_h), interpolation=cv2.INTER_LINEAR)
            return ModelInput(_as_bgr(resized)[None], input_size, (width / model_w, height / model_h), origin=origin)
        resized, used_w, used_h = shrink(image, model_w, model_h)
        return ModelInput(_as_bgr(resized)[None], input_size, (used_w / model_w, used_h / model_h), origin=origin)
    # Letterboxing stays here, not in the graph: OpenVINO 2026.4's Interpolate on an input of dynamic height and
    # width took 8-10 ms for 1280x720 to 192x108 on the 2-core development machine (0.7 ms with a static input
    # shape, which a camera's frame size cannot be known as), against 0.7-1.0 ms for `shrink`.
    factor = min(model_w / width, model_h / height)
    new_w, new_h = max(1, min(model_w, round(width * factor))), max(1, min(model_h, round(height * factor)))
    resized, used_w, used_h = shrink(image, new_w, new_h)
    pad_x, pad_y = (model_w - new_w) // 2, (model_h - new_h) // 2
    if (new_w, new_h) != (model_w, model_h):
        resized = cv2.copyMakeBorder(resized, pad_y, model_h - new_h - pad_y, pad_x, model_w - new_w - pad_x,
                                     cv2.BORDER_CONSTANT, value=0)
    return ModelInput(_as_bgr(resized)[None], input_size, (used_w / new_w, used_h / new_h), (pad_x, pad_y), origin)


SettingsT = TypeVar("SettingsT", bound=DeviceSettings)
SpecT = TypeVar("SpecT", bound=ModelSpec)


class ModelNode(Node[SettingsT]):
    """A node that runs a model of the project's store (`settings.model`; nodes of several models override
    `check` and `prepare` and call `model_slot` per model)."""

    spec_kind: ClassVar[type[ModelSpec]] = ModelSpec
    tasks: ClassVar[tuple[str, ...] | None] = None  # default: every task of spec_kind
    min_side: ClassVar[int] = 2  # smallest image side the node takes
    # Shrink frames by area here (`shrink`), with the model compiled at its own size (no resize in the graph):
    # for models this appliance trains (anomaly, segmentation), whose trainers shrink by area, and whose fine
    # textures a linear resize aliases. A fast anomaly model scored the demo's fresh good tiles 0.48-1.28 times its
    # training-side score (median 0.85) when the graph resized them; its threshold is calibrated on those.
    shrinks_by_area: ClassVar[bool] = False
    slot: ModelSlot  # set by prepare()

    @classmethod
    def check(cls, settings: SettingsT, env: NodeEnvironment) -> Problems:
        assert isinstance(settings, ModelNodeSettings)
        spec, problems = stored_spec(settings.model, env, cls.spec_kind, tasks=cls.tasks)
        return problems if spec is None else cls.check_spec(settings, spec)

    @classmethod
    def check_spec(cls, settings: SettingsT, spec: ModelSpec) -> Problems:
        """Problems of this node's settings against its model's spec."""
        return []

    def prepare(self) -> None:
        assert isinstance(self.settings, ModelNodeSettings)
        self.slot = self.model_slot(self.settings.model)

    def model_slot(self, name: str, input_shape: InputShape | None = None) -> ModelSlot:
        """The slot of model ``name`` on this node's device, loaded (at its own size only where the node
        shrinks frames itself)."""
        assert self.env.runtime is not None
        slot = self.env.runtime.slot(name, self.settings.device, input_shape, own_size=self.shrinks_by_area)
        if slot.current is None:
            slot.load()
        return slot

    def loaded(self, slot: ModelSlot | None = None) -> CompiledModel:
        """The version this frame runs on (read once: a switch meanwhile does not change it)."""
        current = (slot or self.slot).current
        assert current is not None
        return current

    def fit(self, image: np.ndarray, loaded: CompiledModel, fit: Fit = "stretch") -> ModelInput:
        """The node's image as ``loaded`` takes it (checked: grey or BGR, not too small)."""
        bgr_or_grey(image, self.min_side, loaded.name)
        return fit_image(image, loaded.input_size, fit, loaded.input.any_size)

    def record(self, ctx: Context, *models: CompiledModel) -> None:
        """Which model versions answered, on which device (`models` of the answer)."""
        ctx.setdefault("models", []).extend({"node": self.id, "model": loaded.name, "version": loaded.version,
                                             "device": loaded.device} for loaded in models)

    def label(self, loaded: CompiledModel, class_id: int) -> LabelSpec:
        """The spec's label of ``class_id``, or one named after it ("class 7")."""
        labels = getattr(self, "_label_cache", None)
        if labels is None or labels[0] is not loaded:  # a version switch brings other labels
            labels = (loaded, {label.id: label for label in loaded.spec.labels})
            self._label_cache = labels
        return labels[1].get(class_id) or LabelSpec(id=class_id, name=f"class {class_id}", color=None)
