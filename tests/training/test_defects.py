"""Synthetic defects and demo parts: seeded, masks that hold every changed pixel, the sizes of the protocol."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.training.defects import KINDS, add_defect, textures
from appliance.training.demo_parts import FRAME_SIZE, bad_parts, good_parts, write_demo_images
from tests.training.conftest import brick_crop


def test_textures_are_512_grey_and_read_only() -> None:
    table = textures()
    assert set(table) == {"brick", "grass", "gravel", "hubble"}
    for name, image in table.items():
        assert image.shape == (512, 512) and image.dtype == np.uint8, name
        assert not image.flags.writeable
        assert 20 < float(image.std()), name  # a texture, not a flat field
    # The photo is stretched so that its median sits mid-grey like the others (see defects._hubble_texture).
    assert 80 < float(np.median(table["hubble"])) < 130


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("colour", [False, True])
def test_defect_is_deterministic_and_its_mask_holds_every_changed_pixel(kind: str, colour: bool) -> None:
    image = brick_crop(256, np.random.default_rng(0))
    if colour:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    before = image.copy()
    first, first_mask = add_defect(image, kind, np.random.default_rng(42))
    again, again_mask = add_defect(image, kind, np.random.default_rng(42))
    other, _ = add_defect(image, kind, np.random.default_rng(43))
    assert np.array_equal(first, again) and np.array_equal(first_mask, again_mask)
    assert not np.array_equal(first, other)
    assert first.shape == image.shape and first.dtype == np.uint8 and first_mask.shape == image.shape[:2]
    changed = first != image
    if colour:
        changed = changed.any(axis=2)
    assert changed.any() and not (changed & ~first_mask).any()
    # Most of the mask is visibly changed (a +90 line may meet pixels that were already white).
    assert changed[first_mask].mean() > 0.5
    assert np.array_equal(image, before)  # the input is left as it was


def test_defect_sizes_follow_the_protocol() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        image = brick_crop(0, rng)
        _, spot = add_defect(image, "spot", rng)
        radius = np.sqrt(spot.sum() / np.pi)
        assert 2.5 <= radius <= 8.8
        _, foreign = add_defect(image, "foreign", rng, foreign_from=textures()["gravel"])
        ys, xs = np.nonzero(foreign)
        assert 20 <= np.ptp(ys) + 1 == np.ptp(xs) + 1 <= 40
        _, scratch = add_defect(image, "scratch", rng)
        ys, xs = np.nonzero(scratch)
        assert 25 <= np.hypot(np.ptp(ys), np.ptp(xs)) <= 100
    _, big = add_defect(brick_crop(0, rng), "spot", rng, scale=2.0)
    assert np.sqrt(big.sum() / np.pi) >= 5.5


def test_unknown_kind_and_wrong_images_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown defect kind 'crack'; known: scratch, spot"):
        add_defect(np.zeros((64, 64), np.uint8), "crack", rng)
    with pytest.raises(ValueError, match="u8 grey or BGR"):
        add_defect(np.zeros((64, 64), np.float32), "spot", rng)


def test_demo_parts_are_seeded_frames_with_masks_on_the_tile() -> None:
    good = good_parts(3, seed=0)
    assert all(image.shape == (*FRAME_SIZE, 3) and image.dtype == np.uint8 for image in good)
    assert all(np.array_equal(a, b) for a, b in zip(good, good_parts(3, seed=0), strict=True))
    assert not np.array_equal(good[0], good_parts(1, seed=1)[0])
    images, masks = bad_parts(5, seed=0)
    for image, mask in zip(images, masks, strict=True):
        assert mask.shape == FRAME_SIZE and 20 < mask.sum() < 0.1 * mask.size
        # Defects are on the tile, never on the dark belt around it.
        assert float(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[mask].mean()) > 0 and not mask[:8].any()
    assert not any(np.array_equal(a, b) for a in images for b in good_parts(5, seed=0))


def test_write_demo_images_writes_good_bad_and_masks(tmp_path: Path) -> None:
    written = write_demo_images(tmp_path, n_good=3, n_bad=5, seed=2)
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == ["good_000.png", "good_001.png", "good_002.png"]
    names = sorted(p.name for p in (tmp_path / "bad").iterdir())
    assert names == ["bad_000_scratch.png", "bad_001_spot.png", "bad_002_foreign.png", "bad_003_stain.png",
                     "bad_004_hole.png"]
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == names
    assert len(written["good"]) == 3 and len(written["bad"]) == 5
    frame = cv2.imread(str(tmp_path / "bad" / names[4]), cv2.IMREAD_COLOR)
    assert np.array_equal(frame, bad_parts(5, seed=2)[0][4])
    mask = cv2.imread(str(tmp_path / "masks" / names[4]), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(mask > 0, bad_parts(5, seed=2)[1][4])
