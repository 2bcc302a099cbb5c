"""color@1: convert the image to grayscale, or back to 3-channel BGR for nodes that need colour input."""

from __future__ import annotations

import cv2

from appliance.context import Context
from appliance.nodes.base import Node
from appliance.nodes.settings import ColorSettings


class Color(Node[ColorSettings]):
    takes_gray = True
    settings_model = ColorSettings

    def run(self, ctx: Context) -> None:
        image = ctx["image"]
        if self.settings.to == "gray" and image.ndim == 3:
            ctx["image"] = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        elif self.settings.to == "bgr" and image.ndim == 2:
            ctx["image"] = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
