"""mask@1: what it paints over, pixel for pixel, in colour and gray and after a crop; and its settings errors with
the flow file's line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.context import Context
from appliance.errors import ConfigError
from appliance.frames import Frame
from appliance.project import Project
from tests.conftest import write_project


def frame() -> np.ndarray:
    """120 x 160, every pixel different from its neighbours (so a painted or moved pixel shows)."""
    ys, xs = np.mgrid[0:120, 0:160]
    return np.dstack([xs, ys, (xs + ys) % 256]).astype(np.uint8)


def masked(folder: Path, nodes: dict, image: np.ndarray | None = None) -> Context:
    """The context after the flow ``nodes`` ran on ``image`` (default: `frame()`)."""
    project = Project.load(write_project(folder, {"nodes": nodes}))
    try:
        project.prepare()
        ctx = project.inspect(Frame(frame() if image is None else image, "test"), "")
    finally:
        project.close()
    assert ctx["errors"] == []
    return ctx


def test_rectangles_are_painted_with_the_fill_and_nothing_else_changes(tmp_path: Path) -> None:
    ctx = masked(tmp_path, {"m": {"type": "mask@1", "fill": [1, 2, 3], "rectangles": [
        {"x": 10, "y": 20, "width": 30, "height": 5}, {"x": 100, "y": 0, "width": 1, "height": 120}]}})
    expected = frame()
    expected[20:25, 10:40] = (1, 2, 3)  # BGR as given
    expected[:, 100] = (1, 2, 3)
    assert np.array_equal(ctx["image"], expected)
    assert ctx["result"] is True and ctx["detectedRectangles"] == []  # masking is no finding


def test_the_default_fill_is_black(tmp_path: Path) -> None:
    ctx = masked(tmp_path, {"m": {"type": "mask@1", "rectangles": [{"x": 0, "y": 0, "width": 2, "height": 2}]}})
    expected = frame()
    expected[:2, :2] = 0
    assert np.array_equal(ctx["image"], expected)


def test_a_polygon_is_filled_including_its_outline(tmp_path: Path) -> None:
    # An axis-aligned quadrilateral: OpenCV's fillPoly paints its border pixels too, so x 10..29 and y 50..59.
    ctx = masked(tmp_path, {"m": {"type": "mask@1", "fill": [255, 255, 255],
                                  "polygons": [[[10, 50], [29, 50], [29, 59], [10, 59]]]}})
    expected = frame()
    expected[50:60, 10:30] = 255
    assert np.array_equal(ctx["image"], expected)


def test_a_triangle_covers_its_inside_and_leaves_the_far_corner(tmp_path: Path) -> None:
    ctx = masked(tmp_path, {"m": {"type": "mask@1", "fill": [255, 255, 255],
                                  "polygons": [[[0, 0], [59, 0], [0, 59]]]}})
    image, original = ctx["image"], frame()
    painted = (image == 255).all(axis=2)  # no pixel of `frame()` is white
    ys, xs = np.nonzero(painted)
    assert (xs + ys <= 60).all()  # nothing beyond the hypotenuse
    assert painted[:10, :10].all() and painted[29, 29] and not painted[40, 40]
    assert np.array_equal(image[~painted], original[~painted])


def test_invert_keeps_only_the_shapes(tmp_path: Path) -> None:
    ctx = masked(tmp_path, {"m": {"type": "mask@1", "invert": True, "fill": [9, 9, 9],
                                  "rectangles": [{"x": 40, "y": 30, "width": 20, "height": 10}],
                                  "polygons": [[[100, 80], [109, 80], [109, 89], [100, 89]]]}})
    expected = np.full((120, 160, 3), 9, np.uint8)
    expected[30:40, 40:60] = frame()[30:40, 40:60]
    expected[80:90, 100:110] = frame()[80:90, 100:110]
    assert np.array_equal(ctx["image"], expected)


def test_a_gray_image_is_painted_with_the_fills_first_value(tmp_path: Path) -> None:
    gray = frame()[:, :, 0].copy()
    ctx = masked(tmp_path, {"m": {"type": "mask@1", "fill": [77, 0, 0],
                                  "rectangles": [{"x": 5, "y": 5, "width": 10, "height": 10}]}}, gray)
    expected = gray.copy()
    expected[5:15, 5:15] = 77
    assert ctx["image"].shape == (120, 160) and np.array_equal(ctx["image"], expected)


def test_coordinates_are_pixels_of_the_image_after_a_crop(tmp_path: Path) -> None:
    ctx = masked(tmp_path, {
        "roi": {"type": "crop@1", "x": 50, "y": 40, "width": 60, "height": 50, "next": ["m"]},
        "m": {"type": "mask@1", "rectangles": [{"x": 0, "y": 0, "width": 10, "height": 10}]}})
    expected = frame()[40:90, 50:110].copy()
    expected[:10, :10] = 0
    assert np.array_equal(ctx["image"], expected)


def test_a_rectangle_reaching_past_the_image_paints_what_overlaps(tmp_path: Path) -> None:
    ctx = masked(tmp_path, {"m": {"type": "mask@1",
                                  "rectangles": [{"x": 150, "y": 110, "width": 100, "height": 100}]}})
    expected = frame()
    expected[110:, 150:] = 0
    assert np.array_equal(ctx["image"], expected)


def test_the_input_frame_is_not_painted(tmp_path: Path) -> None:
    image = frame()
    masked(tmp_path, {"m": {"type": "mask@1", "rectangles": [{"x": 0, "y": 0, "width": 160, "height": 120}]}},
           image)
    assert np.array_equal(image, frame())  # the caller's frame (shared memory, a camera buffer) stays as it was


FLOW = """\
nodes:
  m:
    type: mask@1
    rectangles:
      - {x: 0, y: 0, width: 0, height: 5}
      - {x: 1, y: 1, widht: 3, height: 3}
    polygons:
      - [[0, 0], [5, 5]]
    fill: [0, 0]
"""


def test_settings_errors_name_the_flow_file_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "flow.yaml").write_text(FLOW)
    (tmp_path / "project.yaml").write_text("name: masks\nflow: flow.yaml\n")
    with pytest.raises(ConfigError) as caught:
        Project.load(tmp_path)
    flow_file = tmp_path / "flow.yaml"
    assert caught.value.problems == [
        # The misspelt key leaves `width` missing: named at the list that lacks it, and the typo at its own place.
        f"{flow_file}:4:5 nodes.m.rectangles[1].width: required key is missing",
        f"{flow_file}:5:29 nodes.m.rectangles[0].width: Input should be greater than 0",
        f"{flow_file}:6:22 nodes.m.rectangles[1].widht: unknown key (did you mean 'width'?)",
        f"{flow_file}:8:9 nodes.m.polygons[0]: List should have at least 3 items after validation, not 2",
        f"{flow_file}:9:5 nodes.m.fill[2]: required key is missing",
    ]
