"""crop@1: keep a rectangular region of interest; later rectangles still refer to the input frame."""

from __future__ import annotations

import numpy as np

from appliance.context import Context
from appliance.nodes.base import Node, NodeError
from appliance.nodes.settings import CropSettings


class Crop(Node[CropSettings]):
    takes_gray = True
    settings_model = CropSettings

    def run(self, ctx: Context) -> None:
        s = self.settings
        image = ctx["image"]
        height, width = image.shape[:2]
        right, bottom = s.x + s.width, s.y + s.height
        if right > width or bottom > height:
            if s.outside == "error" or s.x >= width or s.y >= height:
                raise NodeError(f"crop {s.x},{s.y} {s.width}x{s.height} is outside the {width}x{height} image")
            right, bottom = min(right, width), min(bottom, height)
        offset = np.array([[1, 0, s.x], [0, 1, s.y], [0, 0, 1]], float)
        ctx.transform_image(image[s.y:bottom, s.x:right], offset)
