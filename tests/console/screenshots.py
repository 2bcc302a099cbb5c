"""The console's screenshots in docs/images/console-*.png, made from a real session on the demo project:

    .venv/bin/python -m tests.console.screenshots [--out docs/images]

A copy of projects/demo (frames written, model `parts` trained) is served on 127.0.0.1; examples/camera_loop.py
sends its good and bad frames in a loop while headless Chromium (Debian's, through Playwright) opens every screen:
Live, Inspect (a defective part), Teach (12 good and 6 bad images, trained, the threshold moved), Models and flow
(after the new version was saved and serves), Gallery, and the login form of a project that listens beyond this
machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from playwright.sync_api import sync_playwright

from tests.conftest import REPO, start_server
from tests.console.conftest import CHROMIUM

VIEWPORT = {"width": 1440, "height": 900}


def prepare(folder: Path) -> Path:
    from appliance.training.anomaly import default_backbone, load_images
    from appliance.training.demo_parts import write_demo_images
    from appliance.training.export import save_anomaly_model
    from appliance.training.modes import train_by_mode

    write_demo_images(folder / "images", 12, 6, seed=0)
    good, _ = load_images(folder / "images" / "good")
    save_anomaly_model(train_by_mode(good, default_backbone(), mode="fast"), folder / "models" / "parts")
    config = yaml.safe_load((REPO / "projects" / "demo" / "project.yaml").read_text())
    config["flow"] = str(REPO / "flows" / "demo.yaml")
    (folder / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    if CHROMIUM is None:
        print("needs chromium (make test-tools)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        project = prepare(Path(tmp) / "demo")
        images = project / "images"
        mixed = Path(tmp) / "line"
        mixed.mkdir()
        for index, path in enumerate(sorted((images / "good").glob("*.png"))[:9] + sorted((images / "bad").glob("*.png"))):
            shutil.copy(path, mixed / f"{index % 5}-{path.name}")  # good and bad parts interleaved
        server = start_server(project, log_level="INFO")
        line = subprocess.Popen([sys.executable, str(REPO / "examples" / "camera_loop.py"), "--source", str(mixed),
                                 "--url", server.url, "--rate", "4", "--loop", "--as", "bayer"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(f"{server.url}/console/#live")
                time.sleep(8)  # a few frames and two stats samples
                page.wait_for_function("() => document.querySelector('#live-image').dataset.number > 5", timeout=60_000)
                page.screenshot(path=str(args.out / "console-live.png"))

                page.goto(f"{server.url}/console/#inspect")
                page.set_input_files("#inspect-file", str(images / "bad" / "bad_001_spot.png"))
                page.wait_for_selector("#inspect-result:not([hidden])")
                page.screenshot(path=str(args.out / "console-inspect.png"))

                page.goto(f"{server.url}/console/#teach")
                page.wait_for_selector("#teach-model option", state="attached")
                page.set_input_files("[data-files=good]", [str(p) for p in sorted((images / "good").glob("*.png"))])
                page.wait_for_function("() => document.querySelector('#good-count').textContent.startsWith('12 of')")
                page.set_input_files("[data-files=bad]", [str(p) for p in sorted((images / "bad").glob("*.png"))])
                page.wait_for_function("() => document.querySelector('#bad-count').textContent.startsWith('6 of')")
                page.click("#train")
                page.wait_for_selector("#teach-result:not([hidden])", timeout=300_000)
                # A moved threshold: the borderline unseen good part flips to NG (the page counts it, no call).
                borderline = page.locator("#scored .scored-item[data-set=good][data-unseen=yes]").evaluate_all(
                    "items => Math.max(...items.map(i => Number(i.dataset.score)))")
                page.fill("#threshold-input", f"{borderline * 0.99:.4g}")
                page.set_viewport_size({"width": 1440, "height": 1480})
                page.evaluate("() => window.scrollTo(0, 0)")
                page.screenshot(path=str(args.out / "console-teach.png"))
                page.set_viewport_size(VIEWPORT)
                page.click("#threshold-reset")
                page.click("#teach-save")
                page.wait_for_function("() => document.querySelector('#save-status').textContent.startsWith('Version')",
                                       timeout=120_000)

                page.goto(f"{server.url}/console/#models")
                page.wait_for_selector("#flow svg g.node")
                page.hover("#flow g.node[data-node=surface]")
                page.screenshot(path=str(args.out / "console-models.png"))

                page.goto(f"{server.url}/console/#gallery")
                page.wait_for_selector("#gallery .shot")
                time.sleep(1)
                page.screenshot(path=str(args.out / "console-gallery.png"))
                browser.close()
        finally:
            line.terminate()
            line.wait(10)
            server.stop()

        exposed = Path(tmp) / "exposed"
        shutil.copytree(project, exposed, ignore=shutil.ignore_patterns("console", "server.log"))
        config = yaml.safe_load((exposed / "project.yaml").read_text())
        config.update(host="0.0.0.0", api_key="line-7-key")
        (exposed / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        server = start_server(exposed, "--host", "0.0.0.0")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1100, "height": 640})
                page.goto(f"{server.url}/console/")
                page.wait_for_selector("#view-login:not([hidden])")
                page.screenshot(path=str(args.out / "console-login.png"))
                browser.close()
        finally:
            server.stop()
    for name in ("live", "inspect", "teach", "models", "gallery", "login"):
        print(args.out / f"console-{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
