"""The flow engine on real nodes and real hooks: branch semantics, hook failures, geometry of rectangles."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.context import Context, finish, to_json
from appliance.project import Project
from tests.conftest import write_project


def run(project_dir, image=None, data=""):
    project = Project.load(project_dir)
    project.prepare()
    image = np.full((100, 200, 3), 200, np.uint8) if image is None else image
    ctx = project.runner.run(Context.for_frame(image, data))
    finish(ctx, 0.0)
    project.close()
    return ctx


MARK = """
def main(context, form):
    context["detectedRectangles"].append({"x": form["x"], "y": 0, "width": 10, "height": 10,
                                          "classNames": [{"label": form["label"]}]})
    if "result" in form:
        context["result"] = form["result"]
    if form.get("exit"):
        context["exit"] = True
    context["custom_" + form["label"]] = 1
    print("hello from", form["label"])
"""


def test_parallel_branches_and_their_results_and_rectangles(tmp_path):
    flow = {"nodes": {
        "start": {"type": "code@1", "module": "mark", "form": {"x": 0, "label": "start"}, "next": ["a", "b"]},
        "a": {"type": "code@1", "module": "mark", "form": {"x": 20, "label": "a", "result": True}},
        "b": {"type": "code@1", "module": "mark", "form": {"x": 40, "label": "b", "result": False}},
    }}
    ctx = run(write_project(tmp_path, flow, hooks={"mark": MARK}))
    assert ctx["result"] is False  # AND of the branches: one NG branch makes the part NG
    assert [r["classNames"][0]["label"] for r in ctx["detectedRectangles"]] == ["start", "a", "b"]
    assert [r["id"] for r in ctx["detectedRectangles"]] == [1, 2, 3]
    assert ctx["stdout"] == "hello from start\nhello from a\nhello from b\n"
    # Custom keys of parallel branches are dropped at the end; the key set before the fork stays.
    assert "custom_start" in ctx and "custom_a" not in ctx and "custom_b" not in ctx


def test_exit_ends_only_its_branch_and_keys_of_the_one_running_branch_are_kept(tmp_path):
    flow = {"nodes": {
        "a": {"type": "code@1", "module": "mark", "form": {"x": 0, "label": "a", "exit": True}, "next": ["a2"]},
        "a2": {"type": "code@1", "module": "mark", "form": {"x": 5, "label": "a2"}},
        "b": {"type": "code@1", "module": "mark", "form": {"x": 40, "label": "b", "result": True}},
    }}
    ctx = run(write_project(tmp_path, flow, hooks={"mark": MARK}))
    labels = [r["classNames"][0]["label"] for r in ctx["detectedRectangles"]]
    assert labels == ["a", "b"]
    assert ctx["result"] is True
    assert ctx["custom_b"] == 1 and "custom_a" not in ctx


def test_branches_merge_at_a_join_node_and_continue(tmp_path):
    flow = {"nodes": {
        "fork": {"type": "code@1", "module": "mark", "form": {"x": 0, "label": "fork"}, "next": ["left", "right"]},
        "left": {"type": "crop@1", "x": 0, "y": 0, "width": 50, "height": 50, "next": ["join"]},
        "right": {"type": "code@1", "module": "mark", "form": {"x": 1, "label": "right"}, "next": ["join"]},
        "join": {"type": "evaluate@1", "rules": [{"rule": "max_rectangles", "count": 1}]},
    }}
    ctx = run(write_project(tmp_path, flow, hooks={"mark": MARK}))
    assert len(ctx["detectedRectangles"]) == 2
    assert ctx["result"] is False
    # The image returns to its value before the fork: the crop in one branch does not leak into the answer.
    assert ctx["image"].shape == (100, 200, 3)


def test_a_node_joining_only_some_branches_is_refused(tmp_path):
    flow = {"nodes": {
        "fork": {"type": "flip@1", "direction": "both", "next": ["a", "b"]},
        "a": {"type": "flip@1", "direction": "both", "next": ["join", "elsewhere"]},
        "b": {"type": "flip@1", "direction": "both", "next": ["join"]},
        "join": {"type": "flip@1", "direction": "both"},
        "elsewhere": {"type": "flip@1", "direction": "both"},
    }}
    from appliance.errors import ConfigError
    with pytest.raises(ConfigError) as caught:
        Project.load(write_project(tmp_path, flow))
    assert any("nodes.join: joins branches that do not all meet here" in p for p in caught.value.problems)


def test_rectangles_found_after_crop_resize_and_rotation_are_in_input_frame_pixels(tmp_path):
    hook = """
    import cv2
    def main(context):
        gray = cv2.cvtColor(context["image"], cv2.COLOR_BGR2GRAY)
        x, y, w, h = cv2.boundingRect((gray < 50).astype("uint8"))
        context["detectedRectangles"].append({"x": x, "y": y, "width": w, "height": h})
    """
    flow = {"nodes": {
        "crop": {"type": "crop@1", "x": 100, "y": 50, "width": 300, "height": 200, "next": ["half"]},
        "half": {"type": "resize@1", "scale": 0.5, "next": ["turn"]},
        "turn": {"type": "rotate@1", "angle": 90, "next": ["find"]},
        "find": {"type": "code@1", "module": "find"},
    }}
    image = np.full((400, 600, 3), 255, np.uint8)
    image[120:160, 200:280] = 0  # a dark part: x 200..280, y 120..160
    ctx = run(write_project(tmp_path, flow, hooks={"find": hook}), image)
    (rect,) = ctx["detectedRectangles"]
    assert rect["source"]["type"] == "CODE"
    assert abs(rect["x"] - 200) <= 2 and abs(rect["y"] - 120) <= 2
    assert abs(rect["width"] - 80) <= 3 and abs(rect["height"] - 40) <= 3
    assert ctx["image"].shape == (150, 100, 3)


@pytest.mark.parametrize("angle", [30, -45, 135])
def test_arbitrary_rotation_maps_a_rectangle_back_to_cover_the_part(tmp_path, angle):
    hook = """
    import cv2
    def main(context):
        gray = cv2.cvtColor(context["image"], cv2.COLOR_BGR2GRAY)
        x, y, w, h = cv2.boundingRect((gray < 50).astype("uint8"))
        context["detectedRectangles"].append({"x": x, "y": y, "width": w, "height": h})
    """
    flow = {"nodes": {"turn": {"type": "rotate@1", "angle": angle, "fill": [255, 255, 255], "next": ["find"]},
                      "find": {"type": "code@1", "module": "find"}}}
    image = np.full((300, 400, 3), 255, np.uint8)
    image[100:140, 150:190] = 0
    ctx = run(write_project(tmp_path, flow, hooks={"find": hook}), image)
    (rect,) = ctx["detectedRectangles"]
    # The box found in the rotated image is axis-aligned there; mapped back, its cover is larger than
    # the 40 px square by at most (|cos| + |sin|)^2 <= 2, and it is centred on it.
    assert rect["x"] <= 151 and rect["y"] <= 101
    assert rect["x"] + rect["width"] >= 189 and rect["y"] + rect["height"] >= 139
    assert rect["width"] <= 84 and rect["height"] <= 84
    assert abs(rect["x"] + rect["width"] / 2 - 170) <= 2 and abs(rect["y"] + rect["height"] / 2 - 120) <= 2


def test_hook_exception_is_recorded_with_its_line_and_fails_the_part(tmp_path):
    hook = """
    def main(context):
        context["half_done"] = True
        raise KeyError("x")
    """
    flow = {"nodes": {"bad": {"type": "code@1", "module": "bad", "next": ["after"]},
                      "after": {"type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}}
    ctx = run(write_project(tmp_path, flow, hooks={"bad": hook}))
    assert ctx["result"] is False and ctx["error"] is True
    assert ctx["errors"] == [{"node": "bad", "type": "KeyError", "message": "'x'", "line": 4}]
    assert "half_done" not in ctx  # changes of the failing hook are discarded
    assert "evaluation" not in ctx  # the branch ended at the failure


def test_a_failing_hook_logs_its_own_traceback_once_per_line(tmp_path, caplog):
    hook = """
    def main(context):
        if context["data"] == "type":
            raise TypeError("not this one")
        raise KeyError("x")
    """
    project = Project.load(write_project(tmp_path, {"nodes": {"bad": {"type": "code@1", "module": "bad"}}},
                                         hooks={"bad": hook}))
    project.prepare()
    try:
        with caplog.at_level("WARNING", logger="appliance.hooks"):
            for data in ("key", "key", "type", "key", "type"):
                project.runner.run(Context.for_frame(np.zeros((8, 8, 3), np.uint8), data))
    finally:
        project.close()
    records = [record.getMessage() for record in caplog.records if record.name == "appliance.hooks"]
    assert len(records) == 2, records  # one per (exception, line), not one per frame
    assert records[0].startswith("hook bad (bad.py) raised KeyError: 'x' (first time at this line")
    assert 'bad.py", line 5, in main' in records[0] and 'raise KeyError("x")' in records[0]
    assert "appliance/flow" not in records[0]  # the user's frames, not the runner's
    assert records[1].startswith("hook bad (bad.py) raised TypeError: not this one")
    assert 'line 4, in main' in records[1]


def test_hook_with_on_error_continue_keeps_the_flow_going(tmp_path):
    hook = "def main(context):\n    1 / 0\n"
    flow = {"nodes": {"bad": {"type": "code@1", "module": "bad", "on_error": "continue", "next": ["after"]},
                      "after": {"type": "evaluate@1", "rules": [{"rule": "no_rectangles"}]}}}
    ctx = run(write_project(tmp_path, flow, hooks={"bad": hook}))
    assert ctx["errors"][0]["type"] == "ZeroDivisionError"
    assert ctx["result"] is True


def test_hook_that_hangs_is_abandoned_after_the_timeout(tmp_path):
    hook = "import time\ndef main(context):\n    time.sleep(3)\n"
    flow = {"nodes": {"slow": {"type": "code@1", "module": "slow", "timeout_s": 0.3}}}
    project = Project.load(write_project(tmp_path, flow, hooks={"slow": hook}))
    project.prepare()
    ctx = project.runner.run(Context.for_frame(np.zeros((10, 10, 3), np.uint8), ""))
    assert ctx["result"] is False
    assert ctx["errors"][0]["message"] == "hook exceeded 0.3 s"
    assert project.stuck_hooks == 1
    project.close()


@pytest.mark.parametrize("value, message", [
    ('"OK"', "result must be a boolean, got str"),
    ("1.5", "result must be a boolean, got float"),
    ("[]", "result must be a boolean, got list"),
])
def test_hook_result_that_is_not_a_boolean_fails_the_part(tmp_path, value, message):
    hook = f"def main(context):\n    context['result'] = {value}\n"
    ctx = run(write_project(tmp_path, {"nodes": {"h": {"type": "code@1", "module": "h"}}}, hooks={"h": hook}))
    assert ctx["result"] is False
    assert ctx["errors"] == [{"node": "h", "message": message}]


def test_numpy_bool_result_is_accepted(tmp_path):
    hook = "import numpy as np\ndef main(context):\n    context['result'] = np.bool_(False)\n"
    ctx = run(write_project(tmp_path, {"nodes": {"h": {"type": "code@1", "module": "h"}}}, hooks={"h": hook}))
    assert ctx["result"] is False and ctx["errors"] == []


@pytest.mark.parametrize("assignment, expected", [
    ("np.zeros((10, 10, 4), np.uint8)", "image must be uint8 HxW or HxWx3, got uint8 (10, 10, 4)"),
    ("np.zeros((10, 10), np.float64)", "image must be uint8 HxW or HxWx3, got float64 (10, 10)"),
    ("'not an image'", "image must be uint8 HxW or HxWx3, got str None"),
])
def test_hook_that_breaks_the_image_gets_the_previous_image_back(tmp_path, assignment, expected):
    hook = f"import numpy as np\ndef main(context):\n    context['image'] = {assignment}\n"
    flow = {"nodes": {"h": {"type": "code@1", "module": "h", "next": ["c"]},
                      "c": {"type": "crop@1", "x": 0, "y": 0, "width": 5, "height": 5}}}
    ctx = run(write_project(tmp_path, flow, hooks={"h": hook}))
    assert ctx["errors"] == [{"node": "h", "message": expected}]
    assert ctx["image"].shape == (5, 5, 3)


def test_hook_deleting_the_image_gets_it_restored(tmp_path):
    hook = "def main(context):\n    del context['image']\n"
    ctx = run(write_project(tmp_path, {"nodes": {"h": {"type": "code@1", "module": "h"}}}, hooks={"h": hook}))
    assert ctx["errors"] == [{"node": "h", "message": "hook deleted required key 'image'; restored"}]
    assert ctx["image"].shape == (100, 200, 3)


def test_values_that_are_not_json_are_dropped_and_numpy_scalars_become_numbers(tmp_path):
    hook = """
    import datetime, numpy as np
    def main(context):
        context["count"] = np.int64(3)
        context["ratio"] = np.float32(0.5)
        context["flag"] = np.bool_(True)
        context["bad"] = {1, 2}
        context["blob"] = b"xx"
        context["when"] = datetime.datetime(2020, 1, 1)
        context["array"] = np.zeros(3)
        context["nan"] = float("nan")
    """
    ctx = run(write_project(tmp_path, {"nodes": {"h": {"type": "code@1", "module": "h"}}}, hooks={"h": hook}))
    import json
    body = json.loads(to_json(ctx))
    assert body["count"] == 3 and body["ratio"] == 0.5 and body["flag"] is True and body["nan"] is None
    for key in ("bad", "blob", "when", "array"):
        assert key not in body
    dropped = {e["key"]: e["message"] for e in body["errors"]}
    assert dropped["bad"] == "value of type set is not JSON-serialisable; dropped"
    assert dropped["array"] == "value of type ndarray is not JSON-serialisable; dropped"


def test_module_globals_persist_between_frames_and_form_reaches_the_hook(tmp_path):
    hook = """
    calls = 0
    def main(context, form):
        global calls
        calls += 1
        context["calls"] = calls
        context["greeting"] = form["greeting"]
    """
    flow = {"nodes": {"h": {"type": "code@1", "module": "h", "form": {"greeting": "ahoj"}}}}
    project = Project.load(write_project(tmp_path, flow, hooks={"h": hook}))
    project.prepare()
    frame = np.zeros((4, 4, 3), np.uint8)
    counts = [project.runner.run(Context.for_frame(frame, ""))["calls"] for _ in range(3)]
    assert counts == [1, 2, 3]
    project.close()


def test_module_item_and_legacy_image_signatures(tmp_path):
    hooks = {
        "item": "def main(context, module_item):\n    context['node'] = module_item['id']\n",
        "legacy": "def main(img):\n    return img[:2, :3]\n",
    }
    flow = {"nodes": {"i": {"type": "code@1", "module": "item", "next": ["l"]},
                      "l": {"type": "code@1", "module": "legacy"}}}
    ctx = run(write_project(tmp_path, flow, hooks=hooks))
    assert ctx["node"] == "i"
    assert ctx["image"].shape == (2, 3, 3)
