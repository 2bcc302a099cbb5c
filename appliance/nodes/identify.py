"""identify@1: who each face found by a faces@1 node before it is, against the project's gallery.

For every entry of `faces` (faces@1's list, keypoints in input-frame pixels) the node cuts dlib's 150x150 face
chip from the current image, aligned from BlazeFace's eyes and mouth (`appliance/face_chips.py`), computes its
128-D descriptor with dlib's face recognition ResNet (`face_descriptor` in the store) and looks up the nearest
enrolled descriptor in the gallery (`appliance/faces_gallery.py`). The face entry gets `identity` (the
person's name, or null when nobody is closer than `max_distance`), `distance` (to the nearest enrolled
descriptor, null with an empty gallery) and `nearest` (that person's name, whatever the distance).

The gallery is read when the node is prepared and again whenever a file in it changes, so `appliance faces
enrol` needs no restart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.context import Context
from appliance.face_chips import chip_padding, face_chip
from appliance.faces_gallery import Gallery
from appliance.nodes.base import NodeEnvironment, Problems
from appliance.nodes.model import ModelNode
from appliance.nodes.settings import IdentifySettings
from appliance.runtime.spec import FeaturesSpec, ModelSpec


class Identify(ModelNode[IdentifySettings]):
    settings_model = IdentifySettings
    spec_kind = FeaturesSpec

    @classmethod
    def check(cls, settings: IdentifySettings, env: NodeEnvironment) -> Problems:
        problems = super().check(settings, env)
        gallery = env.project_dir / settings.gallery
        if gallery.exists() and not gallery.is_dir():
            problems.append((("gallery",), f"{gallery} is a file; the gallery is a folder of <name>.npy files"))
        return problems

    @classmethod
    def check_spec(cls, settings: IdentifySettings, spec: ModelSpec) -> Problems:
        if spec.input.size[0] != spec.input.size[1]:
            return [(("model",), f"model '{settings.model}' takes {spec.input.size[1]}x{spec.input.size[0]} "
                                 "images; a face descriptor model takes square chips")]
        return []

    def prepare(self) -> None:
        super().prepare()
        self.gallery = Gallery(Path(self.env.project_dir) / self.settings.gallery)

    def unavailable(self) -> str | None:
        self.gallery.refresh()
        if len(self.gallery) == 0:
            return (f"nobody is enrolled in {self.gallery.folder} (appliance faces enrol PROJECT NAME IMAGE..., "
                    "or POST /faces/enrol)")
        return None

    def run(self, ctx: Context) -> None:
        loaded = self.loaded()
        self.gallery.refresh()
        image = ctx["image"]
        size = loaded.input_size[0]
        padding = chip_padding(loaded.spec.input)
        for face in ctx.get("faces") or []:
            keypoints = face.get("keypoints") if isinstance(face, dict) else None
            if not keypoints or len(keypoints) < 4:
                continue  # not a BlazeFace entry: nothing to align on
            points = ctx.image_points(np.asarray(keypoints, np.float64))
            chip = face_chip(image, points, size, padding)
            output = loaded.infer(chip[None])
            match = self.gallery.nearest(output[loaded.output_names[0]].reshape(-1))
            known = match.name is not None and match.distance < self.settings.max_distance
            face["identity"] = match.name if known else None
            face["distance"] = round(match.distance, 4) if match.name is not None else None
            face["nearest"] = match.name
        self.record(ctx, loaded)
