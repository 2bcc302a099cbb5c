"""rotate@1: rotate counter-clockwise by any angle; multiples of 90 are exact, others expand the canvas."""

from __future__ import annotations

import math

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import Node
from appliance.nodes.settings import RotateSettings

_EXACT = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


class Rotate(Node[RotateSettings]):
    settings_model = RotateSettings

    def run(self, ctx: Context) -> None:
        s = self.settings
        image = ctx["image"]
        height, width = image.shape[:2]
        angle = s.angle % 360
        if angle == 0:
            return
        if angle in _EXACT:
            rotated = cv2.rotate(image, _EXACT[int(angle)])
            # Forward matrix old -> new for exact rotations, on pixel indices.
            forward = {
                90: [[0, 1, 0], [-1, 0, width - 1]],
                180: [[-1, 0, width - 1], [0, -1, height - 1]],
                270: [[0, -1, height - 1], [1, 0, 0]],
            }[int(angle)]
        else:
            centre = ((width - 1) / 2, (height - 1) / 2)
            matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
            new_w, new_h = width, height
            if s.expand:
                cos, sin = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
                new_w, new_h = math.ceil(width * cos + height * sin), math.ceil(width * sin + height * cos)
                matrix[0, 2] += (new_w - 1) / 2 - centre[0]
                matrix[1, 2] += (new_h - 1) / 2 - centre[1]
            fill = s.fill if image.ndim == 3 else s.fill[0]
            rotated = cv2.warpAffine(image, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR, borderValue=fill)
            forward = matrix.tolist()
        to_old = np.linalg.inv(np.vstack([np.array(forward, float), [0, 0, 1]]))
        ctx.transform_image(rotated, to_old)
        ctx["angle"] = (ctx.get("angle") or 0.0) + s.angle
