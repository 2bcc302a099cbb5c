"""mask@1: black out (or fill) rectangles and polygons that must not be inspected: fixtures, labels, edges."""

from __future__ import annotations

from typing import Annotated, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from appliance.context import Context
from appliance.nodes.base import Node, NodeSettings


class MaskRectangle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    x: NonNegativeInt
    y: NonNegativeInt
    width: PositiveInt
    height: PositiveInt


class MaskSettings(NodeSettings):
    type: Literal["mask@1"]
    rectangles: list[MaskRectangle] = Field(default_factory=list)
    polygons: list[Annotated[list[tuple[int, int]], Field(min_length=3)]] = Field(
        default_factory=list, description="each a list of at least 3 [x, y] points")
    fill: tuple[int, int, int] = (0, 0, 0)
    # Keep what is inside the shapes instead of blacking it out.
    invert: bool = False


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
