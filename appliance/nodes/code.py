"""code@1: a user's Python hook from the project's code folder, called as PEKAT calls Code modules.

`main(context)`, `main(context, form)` or `main(context, module_item)` is chosen from the signature
(the legacy `main(img)`, which returns an image, too). The hook runs in its own thread pool with a
timeout, on a copy of the context: an exception, a hang or a bad value never breaks the request
(RELIABILITY.md 7.1-7.6). Hooks are trusted code in the server process; they are not sandboxed.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import io
import logging
import sys
import threading
import traceback
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from appliance.context import DROPPED, PRIVATE_KEYS, Context, clean_json
from appliance.nodes.base import Node, NodeEnvironment, NodeError
from appliance.nodes.settings import CodeSettings
from appliance.threads import started_pool

log = logging.getLogger("appliance.hooks")
# A hook failing on every frame logs its traceback once per (exception type, hook line); /metrics counts them all.
REPORTED_FAILURES_MAX = 256

STREAM_CAP = 64 * 1024
# Keys a hook must leave in place for the nodes after it (RELIABILITY 7.6).
REQUIRED_KEYS = ("image", "detectedRectangles", "errors", "data", "imageShape")


class HookFailed(NodeError):
    def __init__(self, entry: dict[str, Any]):
        super().__init__(entry["message"])
        self.entry = entry


class _ThreadStreams(io.TextIOBase):
    """sys.stdout/stderr replacement that sends a hook thread's prints to that request's context."""

    def __init__(self, original: Any, local: threading.local, name: str):
        self.original, self.local, self.name = original, local, name

    def write(self, text: str) -> int:
        buffer = getattr(self.local, self.name, None)
        if buffer is None:
            return self.original.write(text)
        if buffer.tell() < STREAM_CAP:
            buffer.write(text[: STREAM_CAP - buffer.tell()])
        return len(text)

    def flush(self) -> None:
        if getattr(self.local, self.name, None) is None:
            self.original.flush()


class HookRunner:
    """The project's hook threads, the stuck-hook count and the captured print output."""

    _capture = threading.local()
    _install_lock = threading.Lock()

    def __init__(self, max_stuck: int, workers: int):
        self.max_stuck = max_stuck
        # A stuck thread cannot be killed; extra threads keep the project answering until max_stuck is reached.
        self.executor = started_pool(workers + max_stuck, "hook")
        self._lock = threading.Lock()
        self.stuck = 0
        self._install_streams()

    @classmethod
    def _install_streams(cls) -> None:
        """Wrap sys.stdout/stderr unless they are wrapped: checked each time, not remembered, because whoever
        replaced them since (a test runner's capture, a hook) would otherwise silently end the capture."""
        with cls._install_lock:
            if not isinstance(sys.stdout, _ThreadStreams):
                sys.stdout = _ThreadStreams(sys.stdout, cls._capture, "stdout")  # type: ignore[assignment]
            if not isinstance(sys.stderr, _ThreadStreams):
                sys.stderr = _ThreadStreams(sys.stderr, cls._capture, "stderr")  # type: ignore[assignment]

    def call(self, function: Any, args: tuple[Any, ...], timeout: float) -> tuple[Any, str, str]:
        """Run `function(*args)` in a hook thread; returns (value, stdout, stderr) or raises its exception."""

        def captured() -> tuple[Any, str, str]:
            out, err = io.StringIO(), io.StringIO()
            self._capture.stdout, self._capture.stderr = out, err
            try:
                return function(*args), out.getvalue(), err.getvalue()
            finally:
                self._capture.stdout = self._capture.stderr = None

        future = self.executor.submit(captured)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            with self._lock:
                self.stuck += 1
            future.add_done_callback(self._unstuck)
            raise

    def _unstuck(self, _future: Any) -> None:
        with self._lock:
            self.stuck -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def hook_runner(env: NodeEnvironment) -> HookRunner:
    runner = env.extras.get("hooks")
    if runner is None:
        runner = env.extras["hooks"] = HookRunner(env.config.limits.max_stuck_hooks, workers=4)
    return runner


def _hook_path(settings: CodeSettings, env: NodeEnvironment) -> Path:
    return env.project_dir / env.config.code.folder / f"{settings.module}.py"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class Code(Node[CodeSettings]):
    settings_model = CodeSettings

    @classmethod
    def check(cls, settings: CodeSettings, env: NodeEnvironment) -> list[tuple[tuple[str | int, ...], str]]:
        if not env.code_allowed or not env.config.code.enabled:
            why = "--disable-code" if not env.code_allowed else "code.enabled: false in project.yaml"
            return [(("type",), f"Code nodes are disabled for this project ({why}); remove the node or enable code")]
        path = _hook_path(settings, env)
        if not path.is_file():
            return [(("module",), f"hook file {path} not found")]
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as error:
            return [(("module",), f"{path.name}:{error.lineno}: syntax error: {error.msg}")]
        for statement in tree.body:
            if isinstance(statement, ast.FunctionDef) and statement.name == settings.function:
                params = statement.args.posonlyargs + statement.args.args
                if not 1 <= len(params) <= 2 and statement.args.vararg is None:
                    return [(("function",), f"{settings.function}() in {path.name} must take (context) or "
                                            f"(context, form); it takes {len(params)} arguments")]
                return []
        return [(("function",), f"{path.name} has no top-level function {settings.function}()")]

    def prepare(self) -> None:
        path = _hook_path(self.settings, self.env)
        spec = importlib.util.spec_from_file_location(f"appliance_hook_{self.id}_{self.settings.module}", path)
        assert spec is not None and spec.loader is not None
        module: ModuleType = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.function = getattr(module, self.settings.function)
        self.path = str(path)
        params = list(inspect.signature(self.function).parameters.values())
        self.legacy_image = bool(params) and params[0].name in ("img", "image") and len(params) == 1
        if len(params) >= 2:
            module_item = {"id": self.id, "type": self.settings.type, "form": dict(self.settings.form)}
            self.extra_args: tuple[Any, ...] = (
                module_item if params[1].name == "module_item" else dict(self.settings.form),)
        else:
            self.extra_args = ()
        self.runner = hook_runner(self.env)
        self.reported: set[tuple[str, int | None]] = set()

    def _error_entry(self, error: BaseException) -> dict[str, Any]:
        frames = traceback.extract_tb(error.__traceback__)
        line = None
        for frame in frames:
            if frame.filename == self.path:
                line = frame.lineno
        kind, message = type(error).__name__, _first_line(error)
        if (kind, line) not in self.reported and len(self.reported) < REPORTED_FAILURES_MAX:
            self.reported.add((kind, line))
            # The user's frames only (the runner's are noise to them); values are not shown, only code lines.
            user_frames = [frame for frame in frames if frame.filename == self.path] or frames[-1:]
            log.warning("hook %s (%s) raised %s: %s (first time at this line; later ones are counted in "
                        "appliance_hook_errors_total)\n%s", self.id, Path(self.path).name, kind, message[:200],
                        "".join(traceback.format_list(user_frames)).rstrip())
        return {"node": self.id, "type": kind, "message": message, "line": line}

    def run(self, ctx: Context) -> None:
        work = Context({k: (v if k in ("image", "heatmaps") else copy.deepcopy(v)) for k, v in ctx.items()})
        work["image"] = ctx["image"].copy()
        work["heatmaps"] = list(ctx.get("heatmaps", []))
        rectangles_before = len(work.get("detectedRectangles", []))
        timeout = self.settings.timeout_s or self.env.config.limits.hook_timeout_s
        argument: Any = work["image"] if self.legacy_image else work
        try:
            value, out, err = self.runner.call(self.function, (argument, *self.extra_args), timeout)
        except FutureTimeout:
            self._failed(ctx, {"node": self.id, "type": "TimeoutError", "message": f"hook exceeded {timeout} s"})
            return
        except Exception as error:  # noqa: BLE001 - any failure of user code is reported, never raised
            self._failed(ctx, self._error_entry(error))
            return
        if self.legacy_image and isinstance(value, np.ndarray):
            work["image"] = value
        self._adopt(ctx, work, rectangles_before)
        ctx["stdout"] = (ctx.get("stdout", "") + out)[:STREAM_CAP]
        ctx["stderr"] = (ctx.get("stderr", "") + err)[:STREAM_CAP]

    def _failed(self, ctx: Context, entry: dict[str, Any]) -> None:
        if self.settings.on_error == "continue":
            ctx["errors"].append(entry)
            ctx["error"] = True
            return
        raise HookFailed(entry)

    def _adopt(self, ctx: Context, work: Context, rectangles_before: int) -> None:
        """Take the hook's changes, repairing what would break later nodes or the answer (RELIABILITY 7.2-7.6)."""
        problems: list[dict[str, Any]] = []
        for key in REQUIRED_KEYS:
            if key not in work:
                problems.append({"message": f"hook deleted required key '{key}'; restored"})
                work[key] = ctx[key]
        for key in ("detectedRectangles", "errors"):
            if not isinstance(work[key], list):
                problems.append({"message": f"{key} must be a list, got {type(work[key]).__name__}; restored"})
                work[key] = ctx[key]
        image = work["image"]
        if not self._valid_image(image):
            shape = tuple(getattr(image, "shape", ())) or None
            dtype = getattr(image, "dtype", type(image).__name__)
            problems.append({"message": f"image must be uint8 HxW or HxWx3, got {dtype} {shape}"})
            work["image"] = ctx["image"]
        result = work.get("result")
        if isinstance(result, np.bool_):
            work["result"] = bool(result)
        elif result is not None and not isinstance(result, bool):
            problems.append({"message": f"result must be a boolean, got {type(result).__name__}"})
            work["result"] = False
        for key in list(work):
            if key in PRIVATE_KEYS:
                continue
            cleaned, dropped = clean_json(work[key], key)
            for path, message in dropped:
                problems.append({"key": path, "message": message})
            if cleaned is DROPPED:
                del work[key]
            else:
                work[key] = cleaned
        rectangles = work["detectedRectangles"]
        added = rectangles[rectangles_before:]
        del rectangles[rectangles_before:]
        to_frame = ctx.to_frame
        ctx.clear()
        ctx.update(work)
        ctx.to_frame = to_frame
        for problem in problems:
            ctx["errors"].append({"node": self.id, **problem})
            ctx["error"] = True
        for rectangle in added:
            self._add_hook_rectangle(ctx, rectangle)

    def _add_hook_rectangle(self, ctx: Context, rectangle: Any) -> None:
        try:
            x, y, w, h = (float(rectangle[k]) for k in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError):
            ctx.add_error(self.id, "rectangle needs numeric x, y, width and height; dropped")
            return
        names = rectangle.get("classNames") or [{}]
        first = names[0] if isinstance(names[0], dict) else {}
        color = first.get("color")
        confidence = float(rectangle.get("confidence", 1.0))
        added = ctx.add_rectangle(self.id, x, y, w, h, label=str(first.get("label", self.id)), confidence=confidence,
                                  source_type="CODE", color=color if isinstance(color, str) else None)
        for key, value in rectangle.items():
            if key not in added and key not in ("x", "y", "width", "height"):
                added[key] = value

    def _valid_image(self, image: Any) -> bool:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            return False
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            return False
        return 0 < image.shape[0] * image.shape[1] <= self.env.config.limits.max_frame_pixels
