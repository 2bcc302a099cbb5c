"""mask@1: black out (or fill) rectangles and polygons that must not be inspected: fixtures, labels, edges."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import Node
from appliance.nodes.settings import MaskSettings


class Mask(Node[MaskSettings]):
    settings_model = MaskSettings

    def run(self, ctx: Context) -> None:
        s = self.settings
        image = ctx["image"]
        stencil = np.zeros(image.shape[:2], np.uint8)
        for r in s.rectangles:
            stencil[r.y:r.y + r.height, r.x:r.x + r.width] = 255
        if s.polygons:
            cv2.fillPoly(stencil, [np.array(p, np.int32) for p in s.polygons], 255)
        if s.invert:
            stencil = cv2.bitwise_not(stencil)
        masked = image.copy()
        masked[stencil > 0] = s.fill if image.ndim == 3 else s.fill[0]
        ctx["image"] = masked
