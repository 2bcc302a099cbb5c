"""A project's face gallery (the people identify@1 recognises) and enrolment from photos.

The gallery is a folder, ``gallery/`` in the project by default: one ``<name>.npy`` per person, an N x 128
float32 array of dlib face descriptors (one row per enrolled photo). A person is recognised when the nearest of
all rows is closer than the node's ``max_distance`` (euclidean). Files are replaced atomically (a temporary
file in the folder, fsync, ``os.replace``, fsync of the folder), so a running appliance never reads half a
file, and ``Gallery.refresh`` notices a change without a restart.

``enrol(project_dir, name, images)`` detects the largest face of each image with the project's BlazeFace
model, cuts the chip from its keypoints as identify@1 does and appends the descriptors to ``<name>.npy``;
``appliance faces enrol PROJECT NAME IMAGE...`` calls it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from appliance.errors import ApplianceError, BadRequest, NotFound
from appliance.face_chips import chip_padding, face_chip
from appliance.nodes.settings import DEFAULT_DESCRIPTOR_MODEL, DEFAULT_GALLERY

DESCRIPTOR_SIZE = 128
DEFAULT_FACE_MODEL = "face_full"
# A file name on every file system: letters of any script, digits, space, dot, apostrophe, hyphen, underscore;
# no path separator, no leading dot (hidden files are temporaries).
_NAME = re.compile(r"^[^\W_][\w .'-]{0,99}$")
_RESCAN_SECONDS = 2.0


class GalleryError(BadRequest):
    """An enrolment that cannot be done as asked; the message says why."""


def check_name(name: str) -> str:
    name = name.strip()
    if not _NAME.match(name) or name.endswith((".", " ")):
        raise GalleryError(f"name {name!r}: use 1 to 100 letters, digits, spaces, dots, apostrophes, hyphens or "
                           "underscores, starting with a letter or digit")
    return name


def read_descriptors(path: Path) -> np.ndarray:
    """One person's descriptors (N x 128 float32); raises GalleryError for a file of another shape."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise GalleryError(f"{path}: not a descriptor file ({error})") from None
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != DESCRIPTOR_SIZE or not np.isfinite(array).all():
        raise GalleryError(f"{path}: expected N x {DESCRIPTOR_SIZE} finite descriptors, found shape {array.shape}")
    return array.astype(np.float32)


def write_descriptors(folder: Path, name: str, descriptors: np.ndarray, *, replace: bool = False) -> Path:
    """Append (or with ``replace`` set) ``name``'s descriptors, atomically; returns the file."""
    name = check_name(name)
    descriptors = np.asarray(descriptors, np.float32).reshape(-1, DESCRIPTOR_SIZE)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.npy"
    if path.exists() and not replace:
        descriptors = np.concatenate([read_descriptors(path), descriptors])
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, descriptors, allow_pickle=False)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


@dataclass(frozen=True)
class Match:
    name: str | None  # the nearest person, None when the gallery is empty
    distance: float  # to that person's nearest descriptor; inf when the gallery is empty


class Gallery:
    """The descriptors of a gallery folder, reloaded when a file in it changes (checked by ``refresh``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names: list[str] = []
        self._matrix = np.zeros((0, DESCRIPTOR_SIZE), np.float32)
        self._owner = np.zeros(0, np.int64)
        self._signature: tuple = ()
        self._folder_mtime: int | None = None
        self._scanned = 0.0
        self.problems: list[str] = []
        self.refresh(force=True)

    def _scan(self) -> tuple:
        try:
            return tuple(sorted((entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
                                for entry in os.scandir(self.folder)
                                if entry.name.endswith(".npy") and not entry.name.startswith(".")))
        except FileNotFoundError:
            return ()

    def refresh(self, force: bool = False) -> bool:
        """Reload when the folder changed (its mtime: every atomic replace moves it; and a full look every 2 s for
        files edited in place); True when it reloaded. Unreadable files are skipped and listed in ``problems``."""
        try:
            folder_mtime: int | None = self.folder.stat().st_mtime_ns
        except FileNotFoundError:
            folder_mtime = None
        now = time.monotonic()
        if not force and folder_mtime == self._folder_mtime and now - self._scanned < _RESCAN_SECONDS:
            return False
        self._folder_mtime, self._scanned = folder_mtime, now
        signature = self._scan()
        if not force and signature == self._signature:
            return False
        names: list[str] = []
        rows: list[np.ndarray] = []
        owners: list[np.ndarray] = []
        problems: list[str] = []
        for file_name, _, _ in signature:
            try:
                descriptors = read_descriptors(self.folder / file_name)
            except (GalleryError, FileNotFoundError) as error:
                problems.append(str(error))
                continue
            owners.append(np.full(len(descriptors), len(names)))
            names.append(file_name[:-len(".npy")])
            rows.append(descriptors)
        self.names = names
        self._matrix = np.concatenate(rows) if rows else np.zeros((0, DESCRIPTOR_SIZE), np.float32)
        self._owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        self.problems = problems
        self._signature = signature
        return True

    def __len__(self) -> int:
        return len(self.names)

    def nearest(self, descriptor: np.ndarray) -> Match:
        if not len(self._matrix):
            return Match(None, float("inf"))
        distances = np.linalg.norm(self._matrix - np.asarray(descriptor, np.float32).reshape(1, -1), axis=1)
        best = int(np.argmin(distances))
        return Match(self.names[int(self._owner[best])], float(distances[best]))


# ---------------------------------------------------------------------------------------------------------
# Enrolment


@dataclass(frozen=True)
class EnrolmentSetup:
    """What enrolment takes from a project: where its gallery is and which models it uses."""

    project_dir: Path
    gallery: Path
    face_model: str
    descriptor_model: str


def enrolment_setup(project_dir: Path) -> EnrolmentSetup:
    """The gallery folder and models of the project's identify@1 and faces@1 nodes (defaults without them)."""
    from appliance.config.loader import load_project_files
    from appliance.errors import ConfigError

    try:
        files = load_project_files(Path(project_dir))
    except ConfigError as error:
        raise NotFound(f"project {project_dir}: {error}") from None
    gallery, face_model, descriptor_model = DEFAULT_GALLERY, DEFAULT_FACE_MODEL, DEFAULT_DESCRIPTOR_MODEL
    flows = [files.flow, *files.capability_flows.values()]
    for flow in flows:
        for settings in flow.nodes.values():
            if settings.type == "identify@1":
                gallery = getattr(settings, "gallery", gallery)
                descriptor_model = getattr(settings, "model", descriptor_model)
            elif settings.type == "faces@1":
                face_model = getattr(settings, "model", face_model)
    return EnrolmentSetup(files.directory, files.directory / gallery, face_model, descriptor_model)


class _Enroller:
    """The project's face detector and descriptor model, compiled once for a batch of images."""

    def __init__(self, setup: EnrolmentSetup):
        from appliance.config.loader import load_project_files
        from appliance.nodes.base import NodeEnvironment
        from appliance.nodes.faces import Faces, FacesSettings
        from appliance.runtime.devices import place
        from appliance.runtime.models import Runtime, RuntimeOptions
        from appliance.runtime.store import StoreError

        files = load_project_files(setup.project_dir)
        store = files.directory / files.config.models_dir
        device = place(files.profile).device or "CPU"
        runtime = Runtime(store, RuntimeOptions.from_profile(files.profile, device, None))
        env = NodeEnvironment(project_dir=files.directory, config=files.config, runtime=runtime)
        try:
            settings = FacesSettings.model_validate({"type": "faces@1", "model": setup.face_model, "mode": "none"})
            self.detector = Faces("enrol", settings, env)
            self.detector.prepare()
            self.descriptor = runtime.slot(setup.descriptor_model).load()
        except StoreError as error:
            raise ApplianceError(f"{error} (`make models` puts the face models in the store)", status=503) from None

    def descriptor_of_largest_face(self, image: np.ndarray, what: str) -> np.ndarray:
        from appliance.context import Context

        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        ctx = Context.for_frame(image, "")
        self.detector.run(ctx)
        faces = [face for face in ctx.get("faces", []) if len(face.get("keypoints") or []) >= 4]
        if not faces:
            raise GalleryError(f"{what}: no face found")
        largest = max(faces, key=lambda face: face["box"][2] * face["box"][3])
        size = self.descriptor.input_size[0]
        chip = face_chip(image, np.asarray(largest["keypoints"], np.float64), size,
                         chip_padding(self.descriptor.spec.input))
        output = self.descriptor.infer(chip[None])
        return np.asarray(output[self.descriptor.output_names[0]], np.float32).reshape(DESCRIPTOR_SIZE)


def enrol(project_dir: Path, name: str, images: list[np.ndarray], *, labels: list[str] | None = None) -> int:
    """Add ``name``'s face from each image (BGR or gray, the largest face of each) to the project's gallery.

    Returns the number of descriptors ``name`` has afterwards. Nothing is written unless every image has a
    face. Raises ``GalleryError`` (400) for a bad name, an image without a face or no images,
    ``NotFound`` (404) for a folder that is not a project, and ``ApplianceError`` (503) when a model is missing.
    """
    name = check_name(name)
    if not images:
        raise GalleryError("no images to enrol")
    setup = enrolment_setup(Path(project_dir))
    enroller = _Enroller(setup)
    labels = labels or [f"image {index + 1}" for index in range(len(images))]
    descriptors = np.stack([enroller.descriptor_of_largest_face(image, label)
                            for image, label in zip(images, labels, strict=True)])
    path = write_descriptors(setup.gallery, name, descriptors)
    return len(read_descriptors(path))


def enrol_files(project_dir: Path, name: str, paths: list[Path]) -> int:
    """``enrol`` from image files (any format OpenCV reads); a file that does not decode is a GalleryError."""
    images = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise GalleryError(f"{path}: not an image OpenCV can read" if Path(path).is_file()
                               else f"{path}: no such file")
        images.append(image)
    return enrol(project_dir, name, images, labels=[str(path) for path in paths])
