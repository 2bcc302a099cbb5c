"""nodes/model.py: how a model node brings its image to a model, and maps the model's pixels back."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from appliance.nodes.base import NodeError
from appliance.nodes.model import bgr_or_grey, fit_image


def ramp(height: int, width: int) -> np.ndarray:
    """BGR: blue = column, green = row (mod 256), red 0."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    image[..., 1] = (np.arange(height) % 256).astype(np.uint8)[:, None]
    return image


def test_any_size_backend_takes_a_contiguous_bgr_image_as_it_is_and_maps_its_centres_back():
    image = ramp(400, 600)
    fitted = fit_image(image, (200, 300), "stretch", any_size=True)
    assert fitted.batch.shape == (1, 400, 600, 3) and np.shares_memory(fitted.batch, image)
    # A 2x2 map over the model input: its cell centres are the centres of the image's quadrants.
    to_image = fitted.to_image(2, 2)
    centres = to_image @ np.array([[0, 1], [0, 1], [1, 1]], float)
    assert np.allclose(centres[:2].T, [[149.5, 99.5], [449.5, 299.5]])


def test_a_grey_image_is_resized_first_and_reaches_the_model_as_bgr_at_its_size():
    grey = np.tile(np.arange(640, dtype=np.uint16)[None, :] % 256, (480, 1)).astype(np.uint8)
    fitted = fit_image(grey, (48, 64), "stretch", any_size=True)
    assert fitted.batch.shape == (1, 48, 64, 3)
    assert (fitted.batch[0, ..., 0] == fitted.batch[0, ..., 2]).all()


def test_letterbox_pads_the_short_side_and_points_map_back_through_the_padding():
    image = ramp(100, 200)
    fitted = fit_image(image, (100, 100), "letterbox")
    assert fitted.batch.shape == (1, 100, 100, 3)
    assert fitted.pad == (0, 25) and fitted.scale == (2.0, 2.0)
    assert (fitted.batch[0, :25] == 0).all() and (fitted.batch[0, 75:] == 0).all()
    # The model's corners of the image content are the image's corners.
    assert np.allclose(fitted.points_to_image(np.array([[0, 25], [100, 75]], np.float32)), [[0, 0], [200, 100]])


def test_centre_crop_keeps_the_middle_square_and_maps_back_to_its_place():
    image = ramp(100, 300)
    fitted = fit_image(image, (50, 50), "center_crop")
    assert fitted.origin == (100.0, 0.0) and fitted.scale == (2.0, 2.0)
    # Column 0 of the model input shows image columns from 100: blue there is about 100.
    assert 99 <= int(fitted.batch[0, 25, 0, 0]) <= 101
    assert np.allclose(fitted.points_to_image(np.array([[0, 0], [50, 50]], np.float32)), [[100, 0], [200, 100]])


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((1, 5, 3), np.uint8), "image 5x1 is too small for model 'm'"),
    (np.zeros((8, 8, 4), np.uint8), "needs a gray or BGR image, got shape (8, 8, 4)"),
])
def test_an_image_a_model_cannot_take_is_refused_saying_why(image, message):
    with pytest.raises(NodeError) as refused:
        bgr_or_grey(image, 2, "m")
    assert str(refused.value) == message


def camera_frame(width: int, height: int) -> np.ndarray:
    """scikit-image's astronaut as a BGR camera frame of width x height (fine texture: hair, fabric, stars)."""
    return cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (width, height), interpolation=cv2.INTER_AREA)


def test_a_letterboxed_frame_uses_every_column_and_row_and_maps_back_to_its_corners():
    # 1280 / 192 is not a whole factor: all 1280 columns reach the model (no column is left out), so the model's
    # content corners map back to the frame's corners.
    fitted = fit_image(camera_frame(1280, 720), (192, 192), "letterbox")
    assert fitted.batch.shape == (1, 192, 192, 3) and fitted.pad == (0, 42)
    corners = fitted.points_to_image(np.array([[0, 42], [192, 150]], np.float32))
    assert np.allclose(corners, [[0, 0], [1280, 720]], atol=1e-3)


@pytest.mark.parametrize(("width", "height"), [(1280, 720), (2448, 2048), (640, 480), (1000, 700)])
def test_the_letterbox_content_is_the_area_average_of_the_frame(width, height):
    frame = camera_frame(width, height)
    fitted = fit_image(frame, (192, 192), "letterbox")
    factor = min(192 / width, 192 / height)
    new_w, new_h = round(width * factor), round(height * factor)
    pad_x, pad_y = (int(pad) for pad in fitted.pad)
    content = fitted.batch[0, pad_y:pad_y + new_h, pad_x:pad_x + new_w].astype(np.float32)
    exact = cv2.resize(frame.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
    # Within 2 grey levels on average (the halvings round to whole levels and the last step's cells straddle
    # their blocks); a whole factor first, the last columns left out, was 2.6-4.7 levels off.
    assert np.abs(content - exact).mean() < 2


def test_whole_factors_give_the_exact_block_means():
    # 1920 x 1080 to 192 x 108 is 10 x 10 blocks: halved once, then 5 x 5 blocks, each pixel its block's mean.
    frame = camera_frame(1920, 1080)
    fitted = fit_image(frame, (108, 192), "stretch")
    means = frame.reshape(108, 10, 192, 10, 3).mean(axis=(1, 3))
    assert np.abs(fitted.batch[0].astype(np.float32) - means).max() <= 1
    assert fitted.scale == (10.0, 10.0)


def test_points_map_back_as_float_in_the_type_given():
    fitted = fit_image(ramp(100, 200), (100, 100), "letterbox")
    for points in (np.array([[0, 25], [100, 75]]), np.array([[0, 25], [100, 75]], np.float64)):
        mapped = fitted.points_to_image(points)
        assert mapped.dtype == np.float64 and np.allclose(mapped, [[0, 0], [200, 100]])
    assert fitted.points_to_image(np.array([[50, 50]], np.float32)).dtype == np.float32
    assert fitted.points_to_image(np.zeros((0, 2), np.float32)).shape == (0, 2)
