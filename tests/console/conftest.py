"""Fixtures of the console tests: projects with the console on, a client that holds a console session, the demo
project with a trained anomaly model, and a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import REPO, Server, needs_tool, write_project

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = needs_tool("chromium")

# A flow without a model: the verdict, the save flag and an error come from what the caller sends as `data`.
VERDICT_HOOK = """
def main(context):
    data = context["data"]
    if data.startswith("save"):
        context["save"] = True
    context["result"] = not data.startswith("ng")
"""
VERDICT_FLOW = {"nodes": {"judge": {"type": "code@1", "module": "judge"}}}


def console_project(folder: Path, *, console: dict[str, Any] | None = None, flow: dict | None = None,
                    hooks: dict[str, str] | None = None, **settings: Any) -> Path:
    """A project whose Code hook answers OK, or NG for data starting with 'ng', with the console on."""
    return write_project(folder, flow or VERDICT_FLOW, hooks=hooks or {"judge": VERDICT_HOOK},
                         console={"enabled": True, **(console or {})}, **settings)


class ConsoleClient:
    """A console session as the page holds it: the cookie from GET /console/api/session, the CSRF token on
    every POST."""

    def __init__(self, server: Server):
        self.url = f"{server.url}/console/api"
        self.http = requests.Session()
        answer = self.http.get(f"{self.url}/session", timeout=10)
        answer.raise_for_status()
        self.session = answer.json()

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.http.get(f"{self.url}/{path}", timeout=30, **kwargs)

    def post(self, path: str, payload: Any = None, *, data: bytes | None = None, **kwargs: Any) -> requests.Response:
        headers = {"X-Console-CSRF": self.session["csrf"], **kwargs.pop("headers", {})}
        body = data if data is not None else json.dumps(payload if payload is not None else {}).encode()
        return self.http.post(f"{self.url}/{path}", data=body, headers=headers, timeout=60, **kwargs)


def backbone_path() -> Path:
    from appliance.training.anomaly import default_backbone

    try:
        path = default_backbone()
    except ValueError as error:
        pytest.fail(f"{error} (the console's teaching tests need the pretrained backbone)")
    return path


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """projects/demo's frames and its anomaly model `parts` version 1, trained once for the session from the 12
    good frames as `make demo` trains it (`fast`); copied by each test module that serves it (the console writes
    into the project's folder)."""
    from appliance.training.anomaly import load_images
    from appliance.training.demo_parts import write_demo_images
    from appliance.training.export import save_anomaly_model
    from appliance.training.modes import train_by_mode

    folder = tmp_path_factory.mktemp("console-demo") / "demo"
    images = folder / "images"
    write_demo_images(images, 12, 6, seed=0)
    good, _ = load_images(images / "good")
    save_anomaly_model(train_by_mode(good, backbone_path(), mode="fast"), folder / "models" / "parts")
    config = yaml.safe_load((REPO / "projects" / "demo" / "project.yaml").read_text())
    config["flow"] = str(REPO / "flows" / "demo.yaml")
    (folder / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def demo_copy(template: Path, folder: Path, **settings: Any) -> Path:
    shutil.copytree(template, folder)
    config = yaml.safe_load((folder / "project.yaml").read_text())
    config.update(settings)
    (folder / "project.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, through Playwright (its own browser download is not reachable here).

    Per module, not per session: Playwright's sync API keeps an event loop running in the main thread while it is
    open, and every later test calling asyncio.run() would fail ("cannot be called from a running event loop")."""
    if CHROMIUM is None:
        if os.environ.get("APPLIANCE_REQUIRE_TOOLS") == "1":
            pytest.fail("chromium is missing where `make test-tools` should have installed it")
        pytest.skip("needs chromium (`make test-tools` installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class PageLog:
    """What the browser said while a page was open: console errors and uncaught exceptions."""

    def __init__(self, page: Any):
        self.errors: list[str] = []
        self.lock = threading.Lock()
        page.on("console", lambda message: self._console(message))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console.error: {message.text}")
