"""resize@1: scale the image to a size or by a factor (area interpolation when shrinking)."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import Node
from appliance.nodes.settings import ResizeSettings


class Resize(Node[ResizeSettings]):
    takes_gray = True
    settings_model = ResizeSettings

    def run(self, ctx: Context) -> None:
        s = self.settings
        image = ctx["image"]
        height, width = image.shape[:2]
        if s.scale is not None:
            new_w, new_h = max(1, round(width * s.scale)), max(1, round(height * s.scale))
        else:
            new_w = s.width or max(1, round(width * s.height / height))  # type: ignore[operator]
            new_h = s.height or max(1, round(height * s.width / width))  # type: ignore[operator]
        shrinking = new_w * new_h < width * height
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        # cv2.resize maps pixel centres, so new pixel u covers old (u + 0.5) * sx - 0.5.
        sx, sy = width / new_w, height / new_h
        to_old = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], float)
        ctx.transform_image(resized, to_old)
