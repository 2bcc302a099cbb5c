"""faces@1: find faces with BlazeFace (short or full range) and anonymise them in the image.

Detection is detect@1's (`DetectionNode`: the BlazeFace anchor decoder, threshold, weighted NMS). Each face
region (the face box grown by `margin`) becomes a DETECTION rectangle, and the image that follows the node
(and that `response_type=image` returns) is anonymised by `mode`:

- `pixel`: each region becomes blocks of `block` pixels, each the mean of its pixels;
- `fill`: each region is painted with `color`;
- `black`: everything except the regions is black (the faces alone);
- `box`: the faces are only framed with `color` (the label's colour by default), nothing is hidden;
- `none`: nothing is drawn (the image is the node's input, untouched): detection only, for nodes that follow.

Every face is also listed in `faces` for the nodes that follow (demographics@1, identify): `node`, `box`
(x, y, width, height of its rectangle, input-frame pixels), `score` and `keypoints`, BlazeFace's 6 points
(the person's right eye, left eye, nose tip, mouth centre, right ear, left ear) as [x, y] in input-frame pixels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from appliance.context import Context
from appliance.nodes.base import label_name
from appliance.nodes.detect import Detection, DetectionNode
from appliance.nodes.settings import FacesSettings

Region = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the node's image, x1 and y1 exclusive


def _bgr(hex_colour: str) -> tuple[int, int, int]:
    red, green, blue = (int(hex_colour[index:index + 2], 16) for index in (1, 3, 5))
    return blue, green, red


def _paint(image: np.ndarray, hex_colour: str) -> tuple[int, ...] | int:
    """The colour in the image's channels: gray images get its luminance."""
    bgr = _bgr(hex_colour)
    if image.ndim == 2:
        return int(cv2.cvtColor(np.array([[bgr]], np.uint8), cv2.COLOR_BGR2GRAY)[0, 0])
    return bgr


def region_of(face: Detection, margin: float, width: int, height: int) -> Region:
    grow_x, grow_y = margin * (face.x1 - face.x0), margin * (face.y1 - face.y0)
    return (max(0, math.floor(face.x0 - grow_x)), max(0, math.floor(face.y0 - grow_y)),
            min(width, math.ceil(face.x1 + grow_x)), min(height, math.ceil(face.y1 + grow_y)))


def pixelate(image: np.ndarray, region: Region, block: int) -> None:
    """Blocks of ``block`` pixels from the region's top-left corner, each its pixels' mean (a block cut by the
    region's edge averages its pixels with copies of the edge)."""
    x0, y0, x1, y1 = region
    patch = image[y0:y1, x0:x1]
    height, width = patch.shape[:2]
    rows, columns = math.ceil(height / block), math.ceil(width / block)
    # Padded to whole blocks so that the area resize averages exactly each block's pixels: at a fractional
    # factor its cells drift off the blocks (12 grey levels off the block's own mean, measured on astronaut).
    padded = cv2.copyMakeBorder(patch, 0, rows * block - height, 0, columns * block - width, cv2.BORDER_REPLICATE)
    means = cv2.resize(padded, (columns, rows), interpolation=cv2.INTER_AREA)
    blocks = cv2.resize(means, (columns * block, rows * block), interpolation=cv2.INTER_NEAREST)
    patch[:] = blocks[:height, :width]


def anonymise(image: np.ndarray, regions: list[Region], settings: FacesSettings,
              frame_colour: str) -> np.ndarray:
    """A new image (the input may be a view of the client's frame, e.g. shared memory) with the faces hidden."""
    if settings.mode == "black":
        result = np.zeros_like(image)
        for x0, y0, x1, y1 in regions:
            result[y0:y1, x0:x1] = image[y0:y1, x0:x1]
        return result
    result = image.copy()
    for region in regions:
        x0, y0, x1, y1 = region
        if settings.mode == "pixel":
            pixelate(result, region, settings.block or max(4, round((x1 - x0) / 8)))
        elif settings.mode == "fill":
            result[y0:y1, x0:x1] = _paint(result, settings.color or "#000000")
        else:
            # Four bands inside the region (cv2.rectangle centres its line on the edge, half of it outside).
            colour, line = _paint(result, frame_colour), settings.thickness
            result[y0:min(y1, y0 + line), x0:x1] = colour
            result[max(y0, y1 - line):y1, x0:x1] = colour
            result[y0:y1, x0:min(x1, x0 + line)] = colour
            result[y0:y1, max(x0, x1 - line):x1] = colour
    return result


class Faces(DetectionNode[FacesSettings]):
    settings_model = FacesSettings
    tasks = ("faces",)

    def run(self, ctx: Context) -> None:
        image = ctx["image"]
        faces = self.detect(ctx, image)
        height, width = image.shape[:2]
        regions = [region_of(face, self.settings.margin, width, height) for face in faces]
        regions_and_faces = [(region, face) for region, face in zip(regions, faces, strict=True)
                             if region[2] > region[0] and region[3] > region[1]]
        found = ctx.setdefault("faces", [])
        for (x0, y0, x1, y1), face in regions_and_faces:
            rectangle = ctx.add_rectangle(self.id, x0, y0, x1 - x0, y1 - y0, label=label_name(face.label, ctx),
                                          confidence=face.score, source_type="DETECTION", color=face.label.color,
                                          class_id=face.label.id)
            keypoints = ctx.frame_points(np.array(face.keypoints)).tolist() if face.keypoints else []
            found.append({"node": self.id, "box": [rectangle[key] for key in ("x", "y", "width", "height")],
                          "score": face.score, "keypoints": keypoints})
        if self.settings.mode == "none" or (not regions_and_faces and self.settings.mode != "black"):
            return  # nothing to hide: the image stays as it is, without a copy
        frame_colour = self.settings.color or (faces[0].label.color if faces else None) or "#00ff00"
        # Same geometry, new pixels: the mapping to the input frame does not change.
        ctx["image"] = anonymise(image, [region for region, _ in regions_and_faces], self.settings, frame_colour)
