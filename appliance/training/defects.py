"""Seeded synthetic defects on texture images, with exact masks: the test sets of the anomaly benchmark and demo.

The five kinds follow MODELS.md section 5 (the protocol its measured floors were taken with):

* ``scratch``: a straight line 1-3 px wide, 30-90 px long, +-90 grey levels;
* ``spot``: a filled disc of radius 3-8 px, +-90 grey levels;
* ``foreign``: a 20-40 px square patch cut from another texture;
* ``stain``: a soft-edged ellipse that darkens the surface by 35 %;
* ``hole``: a dark filled polygon (grey 0-25).

Every size is multiplied by ``scale`` (the demo parts use 2 on 384x512 frames, which the model sees at 256x256).
The mask is exactly the set of pixels the defect may change, so every changed pixel is inside it; a pixel
inside it can stay unchanged (a +90 line on a pixel already at 255). Everything random comes from the
``numpy.random.Generator`` passed in, so a seed gives the same image and mask on every machine.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

KINDS: tuple[str, ...] = ("scratch", "spot", "foreign", "stain", "hole")
# The low-contrast variants: half of every pixel's change (add_defect's ``contrast``).
LOW_CONTRAST = 0.5

# Scratches and spots: +-90 grey levels, MODELS.md 5. Stains: -35 % brightness.
_CONTRAST = 90
_STAIN_DARKENING = 0.35
# The stain's soft edge is cut where it would darken by less than 10 % of the full 35 %, so the mask (the
# blurred ellipse's support) is only a few pixels wider than the visible stain and still holds every changed pixel.
_STAIN_TAIL = 0.1


@functools.cache
def _texture_table() -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError as error:  # scikit-image is a test/dev dependency, not needed to serve
        raise RuntimeError("the demo textures come from scikit-image: pip install scikit-image "
                           "(it is in the [test] extra, which `make install` installs)") from error
    table = {"brick": data.brick(), "grass": data.grass(), "gravel": data.gravel(), "hubble": _hubble_texture(data)}
    for image in table.values():
        image.setflags(write=False)
    return table


def _hubble_texture(data: object) -> np.ndarray:
    """A real photo as a fourth texture: the Hubble deep field, grey, top-left 512x512, gamma-stretched.

    The sky of the deep field is a stationary random field (galaxies of every size on sensor noise), like a
    speckled or sprayed coating, unlike the other bundled photos (coffee, rocket, astronaut), whose
    backgrounds are a few hundred pixels of one surface at most. Raw, 95 % of its pixels are below grey 52 and
    the median is 13, where a -35 % stain changes 4 grey levels and a +90 spot is brighter than most galaxies;
    the gamma of 0.31 maps the median to about 100 (p5 80, p95 156), so the defects of this module mean what
    they mean on brick, grass and gravel.
    """
    rgb = data.hubble_deep_field()  # type: ignore[attr-defined]
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[:512, :512]), cv2.COLOR_RGB2GRAY)
    stretched = 255.0 * (grey.astype(np.float32) / 255.0) ** 0.31
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


def textures() -> dict[str, np.ndarray]:
    """512x512 grey u8 textures by name: scikit-image's ``brick``, ``grass``, ``gravel`` and ``hubble`` (a photo).

    The arrays are shared and read-only; copy one before drawing on it.
    """
    return dict(_texture_table())


def _centre(rng: np.random.Generator, shape: tuple[int, ...], reach: float) -> tuple[float, float]:
    """A random (x, y) at least ``reach`` px from every border (the middle when the image is too small)."""
    height, width = shape[:2]
    x_low, x_high = reach, width - 1 - reach
    y_low, y_high = reach, height - 1 - reach
    x = rng.uniform(x_low, x_high) if x_high > x_low else (width - 1) / 2
    y = rng.uniform(y_low, y_high) if y_high > y_low else (height - 1) / 2
    return float(x), float(y)


def _scaled(rng: np.random.Generator, low: float, high: float, scale: float) -> int:
    return max(1, int(round(rng.uniform(low, high) * scale)))


def _shift(image: np.ndarray, mask: np.ndarray, delta: int) -> np.ndarray:
    out = image.astype(np.int16)
    out[mask] += delta
    return np.clip(out, 0, 255).astype(np.uint8)


def _scratch(image: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(image.shape[:2], np.uint8)
    length = rng.uniform(30, 90) * scale
    angle = rng.uniform(0, np.pi)
    thickness = _scaled(rng, 1, 3, scale)
    x, y = _centre(rng, image.shape, length / 2 + thickness + 2)
    dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
    # LINE_8, not anti-aliased: an anti-aliased edge would change pixels by a grey level or two outside the mask.
    cv2.line(mask, (int(round(x - dx)), int(round(y - dy))), (int(round(x + dx)), int(round(y + dy))), 1,
             thickness, cv2.LINE_8)
    return _shift(image, mask > 0, int(rng.choice([-1, 1])) * _CONTRAST), mask > 0


def _spot(image: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(image.shape[:2], np.uint8)
    radius = _scaled(rng, 3, 8, scale)
    x, y = _centre(rng, image.shape, radius + 2)
    cv2.circle(mask, (int(round(x)), int(round(y))), radius, 1, -1, cv2.LINE_8)
    return _shift(image, mask > 0, int(rng.choice([-1, 1])) * _CONTRAST), mask > 0


def _foreign(image: np.ndarray, rng: np.random.Generator, scale: float,
             foreign_from: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    side = _scaled(rng, 20, 40, scale)
    if foreign_from is None:
        table = _texture_table()
        foreign_from = table[sorted(table)[int(rng.integers(len(table)))]]
    source = foreign_from if foreign_from.ndim == 2 else cv2.cvtColor(foreign_from, cv2.COLOR_BGR2GRAY)
    side = min(side, height, width, *source.shape[:2])
    source_top = int(rng.integers(0, source.shape[0] - side + 1))
    source_left = int(rng.integers(0, source.shape[1] - side + 1))
    x, y = _centre(rng, image.shape, side / 2 + 1)
    top = min(max(int(round(y - side / 2)), 0), height - side)
    left = min(max(int(round(x - side / 2)), 0), width - side)
    patch = source[source_top:source_top + side, source_left:source_left + side]
    out = image.copy()
    out[top:top + side, left:left + side] = patch if image.ndim == 2 else patch[:, :, None]
    mask = np.zeros((height, width), bool)
    mask[top:top + side, left:left + side] = True
    return out, mask


def _stain(image: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(image.shape[:2], np.uint8)
    axes = (_scaled(rng, 10, 30, scale), _scaled(rng, 10, 30, scale))
    soft = max(1.5, 0.15 * min(axes))
    x, y = _centre(rng, image.shape, max(axes) + 3 * soft)
    cv2.ellipse(mask, (int(round(x)), int(round(y))), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), soft)
    alpha = np.clip((alpha - _STAIN_TAIL) / (1 - _STAIN_TAIL), 0, 1)
    factor = 1.0 - _STAIN_DARKENING * alpha
    if image.ndim == 3:
        factor = factor[:, :, None]
    return np.clip(np.rint(image.astype(np.float32) * factor), 0, 255).astype(np.uint8), alpha > 0


def _hole(image: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(image.shape[:2], np.uint8)
    radius = rng.uniform(6, 16) * scale
    corners = int(rng.integers(5, 9))
    angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
    radii = radius * rng.uniform(0.5, 1.0, corners)
    x, y = _centre(rng, image.shape, radius + 2)
    polygon = np.stack([x + radii * np.cos(angles), y + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1, cv2.LINE_8)
    inside = mask > 0
    out = image.copy()
    dark = int(rng.integers(0, 26))
    values = np.clip(np.rint(dark + rng.normal(0, 3, int(inside.sum()))), 0, 255).astype(np.uint8)
    out[inside] = values if image.ndim == 2 else values[:, None]
    return out, inside


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator, *, scale: float = 1.0,
               foreign_from: np.ndarray | None = None, contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``image`` (u8 grey HxW or BGR HxWx3) with one defect of ``kind``, and its bool HxW mask.

    ``foreign_from``: the grey or BGR texture the ``foreign`` patch is cut from; by default one of
    ``textures()`` chosen by ``rng`` (pass another texture than the image's own to be sure it is foreign).
    ``contrast``: the share of the full defect's change each pixel gets, in (0, 1]. ``LOW_CONTRAST`` (0.5) is the
    benchmark's low-contrast variant: a +-45 scratch or spot, a 17.5 % stain, a hole or foreign patch blended
    half way into the surface. The same seed draws the same shape at every contrast.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"add_defect needs a u8 grey or BGR image, got {image.dtype} {image.shape}")
    if not 0.0 < contrast <= 1.0:
        raise ValueError(f"contrast must be in (0, 1], got {contrast}")
    if kind == "scratch":
        defective, mask = _scratch(image, rng, scale)
    elif kind == "spot":
        defective, mask = _spot(image, rng, scale)
    elif kind == "foreign":
        defective, mask = _foreign(image, rng, scale, foreign_from)
    elif kind == "stain":
        defective, mask = _stain(image, rng, scale)
    elif kind == "hole":
        defective, mask = _hole(image, rng, scale)
    else:
        raise ValueError(f"unknown defect kind '{kind}'; known: {', '.join(KINDS)}")
    if contrast < 1.0:
        # Half the change of every pixel, rather than a half-size shift: one rule for all five kinds, and a pixel
        # that the full defect clipped at 0 or 255 keeps the proportion of the change it had.
        change = defective.astype(np.float32) - image.astype(np.float32)
        defective = np.clip(np.rint(image.astype(np.float32) + contrast * change), 0, 255).astype(np.uint8)
    return defective, mask
