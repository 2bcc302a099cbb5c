"""RAYPACK Face AI's answer (/raypackfacev3): the faces as JSON, the image with the faces anonymised by
`facemode`, or both.

The anonymisation is faces@1's own (appliance/nodes/faces.py `anonymise`), applied by this API to the frame as
it was received: the `faces` capability's flow only finds the faces, so one flow answers every facemode.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from appliance.nodes.faces import FacesSettings, Region, anonymise
from appliance.server.inspection import Face
from appliance.server.render import Answer, encode

# RAYPACK facemode -> faces@1 mode. "default": "the original image with a bounding box".
FACEMODES = {"default": "box", "pixel": "pixel", "fill": "fill", "black": "black"}
MODES = ("image", "json", "jsonimage")


def face_json(faces: list[Face], seconds: float) -> dict[str, Any]:
    return {"totalfaces": len(faces), "time": round(seconds, 6),
            "faces": [{"xpos": face.x, "ypos": face.y, "width": face.width, "height": face.height,
                       "score": face.score} for face in faces]}


def anonymised(image: np.ndarray, faces: list[Face], facemode: str, colour: str) -> np.ndarray:
    """The frame with the faces framed, pixelated, filled with ``colour`` (rrggbb) or alone on black."""
    height, width = image.shape[:2]
    regions: list[Region] = [(max(0, face.x), max(0, face.y), min(width, face.x + face.width),
                              min(height, face.y + face.height)) for face in faces]
    regions = [region for region in regions if region[2] > region[0] and region[3] > region[1]]
    # A 2-pixel frame vanishes on a 4000-pixel photo once the client scales it to a screen.
    settings = FacesSettings.model_validate({"type": "faces@1", "model": "face_full", "mode": FACEMODES[facemode],
                                             "color": f"#{colour}",
                                             "thickness": max(2, round(min(width, height) / 250))})
    if not regions and settings.mode != "black":
        return image
    return anonymise(image, regions, settings, f"#{colour}")


def face_answer(image: np.ndarray, faces: list[Face], seconds: float, *, mode: str, facemode: str, colour: str,
                jpeg_quality: int) -> Answer:
    document = face_json(faces, seconds)
    if mode == "json":
        return Answer(json.dumps(document).encode("utf-8"), "application/json")
    jpeg, content_type = encode(anonymised(image, faces, facemode, colour), "jpeg", jpeg_quality)
    if mode == "image":
        return Answer(jpeg, content_type)
    document["image"] = base64.b64encode(jpeg).decode("ascii")
    return Answer(json.dumps(document).encode("utf-8"), "application/json")
