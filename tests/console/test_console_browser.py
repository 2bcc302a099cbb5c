"""The console in a real headless Chromium (Debian's, driven by Playwright) against the demo project served on
127.0.0.1: what an engineer sees and does, screen by screen."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import REPO, Server, start_server
from tests.console.conftest import PageLog, demo_copy, needs_chromium

pytestmark = needs_chromium

# Generous bounds for a page on a loaded 2-core machine; the live view's own bound is the second.
LOAD_MS = 15_000
TRAIN_MS = 180_000


@pytest.fixture(scope="module")
def demo(demo_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    project = demo_copy(demo_template, tmp_path_factory.mktemp("browser") / "demo")
    server = start_server(project, log_level="INFO")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser_context(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
    yield context
    context.close()


def open_console(context: Any, server: Server, view: str = "live") -> tuple[Any, PageLog]:
    page = context.new_page()
    log = PageLog(page)
    page.goto(f"{server.url}/console/#{view}")
    page.wait_for_selector("#tabs:not([hidden])", timeout=LOAD_MS)
    return page, log


def project_of(server: Server) -> Path:
    return Path(server.log_file).parent  # start_server logs into the project's folder


def camera_loop(server: Server, source: Path, frames: int, *extra: str) -> str:
    run = subprocess.run([sys.executable, str(REPO / "examples" / "camera_loop.py"), "--source", str(source), "--url",
                          server.url, "--max-frames", str(frames), *extra],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_every_screen_loads_with_no_console_errors(demo: Server, browser_context: Any) -> None:
    page, log = open_console(browser_context, demo)
    assert page.inner_text("#project-name") == "demo"
    for view, ready in (("inspect", "#inspect-drop"), ("teach", "#teach-model option"),
                        ("models", "#flow svg g.node"), ("gallery", "#gallery-summary:not(:empty)"),
                        ("live", "#kpi-queue:not(:has-text('–'))")):
        page.click(f"#tabs a[data-view={view}]")
        page.wait_for_selector(ready, state="attached", timeout=LOAD_MS)
        assert page.is_visible(f"#view-{view}")
    # The flow graph: both nodes of flows/demo.yaml, the edge between them, the anomaly node's settings on hover.
    page.click("#tabs a[data-view=models]")
    assert page.locator("#flow g.node").evaluate_all("nodes => nodes.map(n => n.dataset.node)") == ["surface",
                                                                                                     "verdict"]
    assert page.locator("#flow path.edge").count() == 1
    page.hover("#flow g.node[data-node=surface]")
    assert '"model": "parts"' in page.inner_text("#flow-tip")
    assert page.inner_text("#model-cards tr[data-version='1'] td:nth-child(2)") == "SERVING"
    page.close()
    assert log.errors == []


def test_live_view_shows_the_frame_camera_loop_sent_within_a_second(demo: Server, browser_context: Any) -> None:
    page, log = open_console(browser_context, demo)
    page.wait_for_selector("#kpi-queue:not(:has-text('–'))", timeout=LOAD_MS)  # the stream is open
    sent = time.time()
    output = camera_loop(demo, project_of(demo) / "images" / "bad", 1, "--as", "bayer")
    assert ": NG " in output
    # The answer is back: the page shows that frame (inspected after `sent`) within a second.
    page.wait_for_function("sent => Number(document.querySelector('#live-image').dataset.time || 0) >= sent",
                           arg=sent, timeout=1000)
    assert page.inner_text("#verdict") == "NG"
    assert page.get_attribute("#live-image", "src").startswith("data:image/jpeg;base64,")
    assert "score_below" in page.inner_text("#decided-by")
    assert page.locator("#rect-table tbody tr").count() >= 1
    assert page.locator("#node-times .bar .name").all_inner_texts() == ["surface", "verdict"]
    # The heat map toggle swaps the picture for the one without the overlay.
    with_heat = page.get_attribute("#live-image", "src")
    page.click(".switch")
    assert page.get_attribute("#live-image", "src") != with_heat
    page.close()
    assert log.errors == []


@pytest.fixture(scope="module")
def taught(demo: Server, browser_context: Any) -> Iterator[tuple[Any, PageLog]]:
    """The Teach screen after 12 good images were uploaded and the model trained on them."""
    page, log = open_console(browser_context, demo, "teach")
    good = sorted((project_of(demo) / "images" / "good").glob("*.png"))
    assert len(good) == 12
    page.wait_for_selector("#teach-model option", state="attached", timeout=LOAD_MS)
    assert page.input_value("#teach-mode") == "fast"  # the discriminator, unless the operator chooses another
    page.set_input_files("[data-files=good]", [str(path) for path in good])
    page.wait_for_function("() => document.querySelector('#good-count').textContent.startsWith('12 of')",
                           timeout=60_000)
    assert page.locator("#thumbs-good .thumb").count() == 12
    page.click("#train")
    page.wait_for_selector("#teach-result:not([hidden])", timeout=TRAIN_MS)
    yield page, log
    page.close()


def scored_items(page: Any) -> list[dict[str, Any]]:
    return page.locator("#scored .scored-item").evaluate_all(
        "items => items.map(i => ({name: i.dataset.name, score: Number(i.dataset.score), unseen: i.dataset.unseen, "
        "pill: i.querySelector('.pill').textContent, kind: i.querySelectorAll('.meta')[1].children[0].textContent}))")


def test_teaching_from_12_uploaded_good_images_serves_the_new_version(demo: Server, taught: tuple[Any, PageLog]
                                                                      ) -> None:
    page, log = taught
    assert page.is_visible("#histogram")
    stages = page.locator("#stages li.done").all_inner_texts()
    assert [text.split("\n")[0] for text in stages] == ["Features of every view", "Discriminator", "Threshold",
                                                        "Model written", "Scores of the images", "Total"]
    # The discriminator held 3 of the 12 out of training and fitted the threshold on them in their 8 rotations x
    # flips: those 3 are "unseen" with the verdicts that count, the 9 it trained on are shown apart.
    items = scored_items(page)
    unseen = [item for item in items if item["unseen"] == "yes"]
    assert len(items) == 12 and len(unseen) == 3
    assert {item["kind"] for item in unseen} == {"good · unseen"}
    assert {item["kind"] for item in items if item["unseen"] == "no"} == {"good · trained on"}
    assert page.inner_text("#fitted-on") == ("The threshold is fitted on 3 good images held out of training, each in "
                                             "its 8 rotations x flips (24 scores); the other 9 trained the model.")
    assert json.loads(page.get_attribute("#histogram", "data-bars")) == {"good": 24, "bad": 0, "trained": 9}
    # At the calibrated threshold every good image passes; only the unseen ones count.
    assert [item["pill"] for item in items] == ["OK"] * 12
    assert page.locator("#verdict-counts span").all_inner_texts() == ["Good parts, unseen: 3 OK, 0 NG",
                                                                      "Trained on: 9 OK, 0 NG, not counted"]
    page.click("#teach-save")
    page.wait_for_function("() => document.querySelector('#save-status').textContent.startsWith('Version 2')",
                           timeout=120_000)
    # Version 2 is the discriminator, and the line scores each image as the page listed it.
    spec = yaml.safe_load((project_of(demo) / "models" / "parts" / "2" / "spec.yaml").read_text())
    assert spec["training"]["metrics"]["mode"] == "fast" and spec["training"]["metrics"]["calibration_images"] == 3
    assert spec["threshold"] == pytest.approx(float(page.input_value("#threshold-input")), rel=1e-4)
    # Regions from the held-out good pixels, below the threshold (anomaly@1 keeps those that reach it).
    assert spec["pixel_threshold"] < spec["threshold"]
    for item in items:
        # Each 512 x 384 frame as the camera sent it: the line shrinks it to the model's 256 x 256 as training did
        # (anomaly@1, nodes/model.py `shrink`), so it scores it as the page listed it.
        frame = (project_of(demo) / "images" / "good" / item["name"]).read_bytes()
        answer = requests.post(f"{demo.url}/analyze_image", data=frame, timeout=30).json()
        assert answer["models"] == [{"node": "surface", "model": "parts", "version": "2", "device": "CPU"}]
        assert answer["score"] == pytest.approx(item["score"], rel=2e-3), item
    assert log.errors == []


def test_moving_the_threshold_flips_a_borderline_image(taught: tuple[Any, PageLog]) -> None:
    page, log = taught
    scores = [(item["name"], item["score"]) for item in scored_items(page) if item["unseen"] == "yes"]
    name, highest = max(scores, key=lambda item: item[1])
    runner_up = max(score for other, score in scores if other != name)
    canvas = page.locator("#histogram")
    canvas.scroll_into_view_if_needed()  # as an operator scrolls to it: under the tab bar it takes no pointer
    box = canvas.bounding_box()
    scale = canvas.evaluate("c => [Number(c.dataset.low), Number(c.dataset.high), Number(c.dataset.left), "
                            "Number(c.dataset.plotWidth)]")

    def x_of(value: float) -> float:
        low, high, left, width = scale
        return box["x"] + left + (value - low) / (high - low) * width

    handle = x_of(float(page.input_value("#threshold-input")))
    page.mouse.move(handle, box["y"] + 60)
    page.mouse.down()
    page.mouse.move(x_of((highest + runner_up) / 2), box["y"] + 60, steps=8)
    page.mouse.up()
    item = page.locator(f"#scored .scored-item[data-name='{name}']")
    assert item.locator(".pill").inner_text() == "NG"  # the borderline good image flips, with no call
    assert page.locator("#verdict-counts span").first.inner_text() == "Good parts, unseen: 2 OK, 1 NG"
    page.mouse.move(x_of((highest + runner_up) / 2), box["y"] + 60)
    page.mouse.down()
    page.mouse.move(x_of(highest * 1.05), box["y"] + 60, steps=8)
    page.mouse.up()
    assert item.locator(".pill").inner_text() == "OK"
    assert log.errors == []


def test_the_bank_chosen_on_the_page_scores_every_good_image_as_unseen(taught: tuple[Any, PageLog]) -> None:
    page, log = taught
    page.select_option("#teach-mode", "bank")
    assert page.inner_text("#teach-mode-note").startswith("memory bank")
    page.click("#train")
    page.wait_for_function("() => document.querySelector('#teach-summary').textContent.includes('(bank)')",
                           timeout=TRAIN_MS)
    stages = page.locator("#stages li.done").all_inner_texts()
    assert [text.split("\n")[0] for text in stages] == ["Features of every view", "Memory bank", "Threshold",
                                                        "Model written", "Scores of the images", "Total"]
    # Leave-one-out: each of the 12 scored without the bank entries it gave, and the threshold fitted on those 12.
    items = scored_items(page)
    assert len(items) == 12 and {item["unseen"] for item in items} == {"yes"}
    assert page.inner_text("#fitted-on") == ("The threshold is fitted on 12 good images, each scored by the bank "
                                             "without its own patches (leave-one-out).")
    assert json.loads(page.get_attribute("#histogram", "data-bars")) == {"good": 12, "bad": 0, "trained": 0}
    assert page.locator("#verdict-counts span").all_inner_texts() == ["Good parts, unseen: 12 OK, 0 NG"]
    assert log.errors == []


def test_gallery_lists_the_ng_frames_and_the_zip_holds_them(demo: Server, browser_context: Any) -> None:
    images = project_of(demo) / "images"
    bad = sorted((images / "bad").glob("*.png"))[:3]
    for path in bad:
        answer = requests.post(f"{demo.url}/analyze_image", data=path.read_bytes(), params={"data": path.name},
                               timeout=30).json()
        assert answer["result"] is False
    page, log = open_console(browser_context, demo, "gallery")
    page.select_option("#filter-verdict", "ng")
    page.click("#filter-apply")
    page.wait_for_function("() => document.querySelectorAll('#gallery .shot').length >= 3", timeout=LOAD_MS)
    shots = page.locator("#gallery .shot")
    names = [shots.nth(i).locator(".meta").inner_text() for i in range(3)]
    assert all("verdict — score_below" in text for text in names)
    for i in range(3):
        shots.nth(i).locator("input[type=checkbox]").check()
    assert page.inner_text("#download") == "Download selected (3) as zip"
    with page.expect_download() as download:
        page.click("#download")
    archive = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    frames = sorted(name for name in archive.namelist() if name.endswith(".png"))
    contexts = sorted(name for name in archive.namelist() if name.endswith(".json"))
    assert len(frames) == 3 and len(contexts) == 3 and all(name.startswith("ng/") for name in frames)
    sent = {path.name for path in bad}
    kept = {json.loads(archive.read(name))["data"] for name in contexts}
    assert kept == sent  # the three NG frames just sent, newest first on the page
    page.close()
    assert log.errors == []


def test_without_the_key_the_browser_gets_the_login_form(demo_template: Path, tmp_path: Path,
                                                         browser_context: Any) -> None:
    project = demo_copy(demo_template, tmp_path / "exposed", host="0.0.0.0", api_key="line-7-key")
    server = start_server(project, "--host", "0.0.0.0")
    try:
        page = browser_context.new_page()
        log = PageLog(page)
        page.goto(f"{server.url}/console/#live")
        page.wait_for_selector("#view-login:not([hidden])", timeout=LOAD_MS)
        assert not page.is_visible("#tabs") and not page.is_visible("#view-live")
        page.fill("#login-key", "not-the-key")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#login-error:not([hidden])", timeout=LOAD_MS)
        assert page.inner_text("#login-error") == "wrong key"
        page.fill("#login-key", "line-7-key")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#tabs:not([hidden])", timeout=LOAD_MS)
        (cookie,) = [c for c in browser_context.cookies() if c["name"] == "appliance_console_demo" and
                     c["domain"] == "127.0.0.1" and c["path"] == "/console/"]
        assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it
        # The wrong key's 401 is the only error the browser reported.
        assert [e for e in log.errors if "401" not in e] == []
        page.close()
    finally:
        server.stop()
