"""The benchmark's procedural surfaces (training/surfaces.py) and its low-contrast defects (defects.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.training.defects import KINDS, LOW_CONTRAST, add_defect
from appliance.training.surfaces import SURFACES, main, surface, surfaces


def test_every_surface_is_a_512_grey_read_only_texture_with_a_mid_grey_median() -> None:
    table = surfaces()
    assert set(table) == {"sand", "granite", "felt", "cast_iron", "foam"}
    for name, image in table.items():
        assert image.shape == (512, 512) and image.dtype == np.uint8, name
        assert not image.flags.writeable, name
        assert float(image.std()) > 15, name  # a texture, not a flat field
        # Mid-grey like scikit-image's textures, so a +-90 spot or a -35 % stain means the same on all of them.
        assert 110 <= float(np.median(image)) <= 140, name


def test_surfaces_are_seeded() -> None:
    for name, make in SURFACES.items():
        assert np.array_equal(make(3), make(3)), name
        assert not np.array_equal(make(3), make(4)), name
    assert surface("felt") is surfaces()["felt"]  # cached: the benchmark asks for them again and again


def test_the_training_and_test_halves_of_a_surface_look_alike() -> None:
    # The benchmark trains on rows 0-255 and tests on rows 256-511: a surface must not drift between them.
    for name, image in surfaces().items():
        top, bottom = image[:256].astype(np.float64), image[256:].astype(np.float64)
        assert abs(top.mean() - bottom.mean()) < 4, name
        assert abs(top.std() - bottom.std()) < 0.1 * image.std(), name


def test_unknown_surface_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match="unknown surface 'marble'; known: sand, granite, felt, cast_iron, foam"):
        surface("marble")


def test_command_line_writes_every_surface_as_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--seed", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.png" for name in SURFACES)
    assert np.array_equal(cv2.imread(str(tmp_path / "granite.png"), cv2.IMREAD_GRAYSCALE), surface("granite"))
    assert str(tmp_path / "foam.png") in capsys.readouterr().out


@pytest.mark.parametrize("kind", KINDS)
def test_low_contrast_defect_is_the_same_shape_with_half_the_change(kind: str) -> None:
    image = np.ascontiguousarray(surface("sand")[256:, :256])
    full, full_mask = add_defect(image, kind, np.random.default_rng(5), foreign_from=surface("granite"))
    low, low_mask = add_defect(image, kind, np.random.default_rng(5), foreign_from=surface("granite"),
                               contrast=LOW_CONTRAST)
    assert np.array_equal(full_mask, low_mask)
    full_change = full.astype(np.int16) - image
    low_change = low.astype(np.int16) - image
    # Every pixel moves half as far, rounded to a whole grey level, in the same direction.
    assert np.abs(2 * low_change - full_change).max() <= 1
    assert not (low_change != 0)[~low_mask].any()
    assert np.abs(low_change).sum() > 0.4 * np.abs(full_change).sum()


def test_contrast_outside_0_to_1_is_refused() -> None:
    with pytest.raises(ValueError, match=r"contrast must be in \(0, 1\], got 1.5"):
        add_defect(np.zeros((64, 64), np.uint8), "spot", np.random.default_rng(0), contrast=1.5)
