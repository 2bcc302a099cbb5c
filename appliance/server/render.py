"""The answer images every API can return: the annotated frame (verdict, rectangles, heat map), the heat map
alone, and their encoding.

Rendering and encoding run in the worker thread with the flow. PNG is written uncompressed with no
row filter: OpenCV's default PNG costs about 70 ms for a 1080p frame and level 0 about 12 ms
(measured here), while clients on the line's network gain nothing from a smaller body. JPEG
(`image_format=jpeg`, about 5 ms) is the choice for slower links.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from appliance.context import Context
from appliance.errors import ApplianceError

_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE,
             cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


@dataclass
class Answer:
    """An HTTP answer made in a worker thread; the event loop only sends it."""

    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


def _bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


def _frame_to_image(ctx: Context) -> np.ndarray:
    """Affine map from input-frame pixels to pixels of the final image."""
    return np.linalg.inv(ctx.to_frame)


def _heat(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """The heat maps (values 0..1) combined on the final image's geometry, and where any covers it."""
    image = ctx["image"]
    height, width = image.shape[:2]
    combined = np.zeros((height, width), np.float32)
    covered = np.zeros((height, width), bool)
    for heatmap in ctx.get("heatmaps") or []:
        values = np.asarray(heatmap["map"], np.float32)
        # heat map pixels -> frame -> final image
        matrix = (_frame_to_image(ctx) @ heatmap["to_frame"])[:2]
        warped = cv2.warpAffine(values, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=-1.0)
        inside = warped >= 0
        combined = np.where(inside, np.maximum(combined, warped), combined)
        covered |= inside
    return np.clip(combined, 0, 1), covered


def _colour(heat: np.ndarray) -> np.ndarray:
    return cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)


def heatmap(ctx: Context) -> np.ndarray:
    """The heat maps, colour-mapped onto the final image's geometry; black where there is none."""
    heat, covered = _heat(ctx)
    colored = _colour(heat)
    colored[~covered] = 0
    return colored


def annotated(ctx: Context) -> np.ndarray:
    image = _bgr(ctx["image"]).copy()
    if ctx.get("heatmaps"):
        heat, covered = _heat(ctx)
        # Nodes scale their maps so that 0.5 is their pixel threshold: faint below it, so the part stays
        # visible where nothing is wrong, and more opaque the further above it.
        alpha = np.where(covered, 0.15 + 0.55 * np.clip(2 * heat - 1, 0, 1), 0.0)[:, :, None]
        image = (image * (1 - alpha) + _colour(heat) * alpha).astype(np.uint8)
    to_image = _frame_to_image(ctx)
    for rectangle in ctx.get("detectedRectangles") or []:
        try:
            x, y, w, h = (float(rectangle[k]) for k in ("x", "y", "width", "height"))
            names = rectangle.get("classNames") or [{}]
            label, color = str(names[0].get("label", "")), names[0].get("color")
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        corners = np.array([[x, y, 1], [x + w, y + h, 1]]) @ to_image.T
        (x0, y0), (x1, y1) = corners[:, :2].round().astype(int)
        bgr = _parse_color(color) if isinstance(color, str) else (0, 0, 255)
        cv2.rectangle(image, (x0, y0), (x1, y1), bgr, 2)
        if label:
            cv2.putText(image, label, (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, bgr, 1, cv2.LINE_AA)
    verdict = ctx.get("result")
    cv2.putText(image, "OK" if verdict else "NG", (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.9,
                (0, 200, 0) if verdict else (0, 0, 255), 2, cv2.LINE_AA)
    return image


def _parse_color(text: str) -> tuple[int, int, int]:
    """'#rrggbb' -> BGR; anything else -> red."""
    if len(text) == 7 and text.startswith("#"):
        try:
            r, g, b = (int(text[i:i + 2], 16) for i in (1, 3, 5))
            return b, g, r
        except ValueError:
            pass
    return 0, 0, 255


def encode(image: np.ndarray, image_format: str, jpeg_quality: int) -> tuple[bytes, str]:
    if image_format == "jpeg":
        ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        content_type = "image/jpeg"
    else:
        ok, buffer = cv2.imencode(".png", image, _PNG_FAST)
        content_type = "image/png"
    if not ok:
        raise ApplianceError("the answer image could not be encoded")
    return buffer.tobytes(), content_type


