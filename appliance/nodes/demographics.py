"""demographics@1: age and gender of every face a faces@1 node found before it (dlib's networks, CC0).

For each entry of `faces` (BlazeFace keypoints, input-frame pixels) the node cuts two face chips from the
current image, 64x64 for the age network and 32x32 for the gender network, framed as dlib's
`get_face_chip_details(shape, size, padding=0.2)` frames them: the networks were trained on such chips. The
chips are aligned from BlazeFace's eyes and mouth as identify@1's are (`appliance/face_chips.py`); the nose tip
is left out: it leaves the face plane and moves with the head's turn. On scikit-image's astronaut, dlib's own
chips from its 5-point landmarks give age 33.1 and female 0.87 (docs/models.md has this node's figures).

Each face dict gets `age` (years, the expectation over the 81 age classes), `age_confidence` (the best
class's probability), `gender` (`female` or `male`) and `gender_score` (its probability).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from appliance.context import Context
from appliance.face_chips import chip_padding, face_chip
from appliance.nodes.base import NodeEnvironment, NodeError, Problems, spec_of, stored_spec
from appliance.nodes.model import ModelNode
from appliance.nodes.settings import DemographicsSettings
from appliance.runtime.compiled import CompiledModel
from appliance.runtime.spec import AgeOutputs, DemographicsSpec


def _check_role(spec: DemographicsSpec | None, name: str, role: str, field: str) -> Problems:
    if spec is not None and spec.outputs.role != role:
        return [((field,), f"model '{name}' is not an {role} model (its spec's outputs.role is "
                           f"{spec.outputs.role!r})")]
    return []


class Demographics(ModelNode[DemographicsSettings]):
    settings_model = DemographicsSettings

    @classmethod
    def check(cls, settings: DemographicsSettings, env: NodeEnvironment) -> Problems:
        problems: Problems = []
        for field, role in (("age_model", "age"), ("gender_model", "gender")):
            name = getattr(settings, field)
            spec, found = stored_spec(name, env, DemographicsSpec, field)
            problems += found or _check_role(spec, name, role, field)
        return problems

    def prepare(self) -> None:
        self.age_slot = self.model_slot(self.settings.age_model)
        self.gender_slot = self.model_slot(self.settings.gender_model)

    @staticmethod
    def _probabilities(loaded: CompiledModel, chip: np.ndarray) -> np.ndarray:
        outputs = loaded.infer(chip[None])
        wanted = spec_of(loaded, DemographicsSpec).outputs.probabilities or loaded.output_names[0]
        return outputs.get(wanted, outputs[loaded.output_names[0]]).reshape(-1).astype(np.float64)

    def run(self, ctx: Context) -> None:
        faces = ctx.get("faces")
        if not isinstance(faces, list):
            raise NodeError("no `faces` in the context: put a faces@1 node before this one")
        age, gender = self.loaded(self.age_slot), self.loaded(self.gender_slot)
        image = ctx["image"]
        if image.ndim == 2:
            # Chips are cut from the BGR image (a few small ones: the conversion of the whole is not the cost).
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        age_outputs = spec_of(age, DemographicsSpec).outputs
        if not isinstance(age_outputs, AgeOutputs):
            raise NodeError(f"model '{age.name}' version {age.version} is a {age_outputs.role} model, not an age "
                            "model")
        age_weights = np.asarray(age_outputs.age_weights, float)
        for face in faces:
            keypoints = face.get("keypoints") if isinstance(face, dict) else None
            if not keypoints or len(keypoints) < 4:
                raise NodeError(f"a face of node '{face.get('node') if isinstance(face, dict) else '?'}' has no "
                                "eye and mouth keypoints (BlazeFace, faces@1, gives them)")
            points = ctx.image_points(np.array(keypoints, float))
            ages = self._probabilities(age, face_chip(image, points, age.input_size[0],
                                                      chip_padding(age.spec.input, 0.2)))
            if ages.shape != age_weights.shape:
                raise NodeError(f"model '{age.name}' gives {ages.size} age classes, its spec {age_weights.size} "
                                "weights")
            sexes = self._probabilities(gender, face_chip(image, points, gender.input_size[0],
                                                          chip_padding(gender.spec.input, 0.2)))
            best = int(sexes.argmax())
            found: dict[str, Any] = {"age": round(float(ages @ age_weights), 2),
                                     "age_confidence": round(float(ages.max()), 4),
                                     "gender": self.label(gender, best).name,
                                     "gender_score": round(float(sexes[best]), 4)}
            face.update(found)
        self.record(ctx, age, gender)
