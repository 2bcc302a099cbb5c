"""flip@1: mirror the image horizontally, vertically or both (cameras mounted upside down or via a mirror)."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import Node
from appliance.nodes.settings import FlipSettings

_CODES = {"horizontal": 1, "vertical": 0, "both": -1}


class Flip(Node[FlipSettings]):
    takes_gray = True
    settings_model = FlipSettings

    def run(self, ctx: Context) -> None:
        image = ctx["image"]
        height, width = image.shape[:2]
        direction = self.settings.direction
        flip_x = direction in ("horizontal", "both")
        flip_y = direction in ("vertical", "both")
        to_old = np.array([[-1 if flip_x else 1, 0, width - 1 if flip_x else 0],
                           [0, -1 if flip_y else 1, height - 1 if flip_y else 0], [0, 0, 1]], float)
        ctx.transform_image(cv2.flip(image, _CODES[direction]), to_old)
