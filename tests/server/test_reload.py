"""SIGHUP (`systemctl reload`) reloads project.yaml's flows and the Code hooks beside the serving ones, against
real servers: frames in flight all answer, a bad flow keeps the old one serving and /health says why, settings
fixed at start say they need a restart, and reloads leave no threads or memory behind."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import write_project
from tests.nodes.test_anomaly import FLOW, frame, save_red_detector
from tests.server.test_faults import NotifySocket, metric
from tests.server.test_leaks import process_counts
from tests.server.test_protocol import part_image, png

BODY = png(part_image(False, 16, 16))


def hook(tag: str, result: bool = True, import_seconds: float = 0.0) -> str:
    """A hook that marks each answer with ``tag`` and sets the verdict; its import takes ``import_seconds``."""
    return (f"import time\ntime.sleep({import_seconds})\n\ndef main(context):\n"
            f"    context['flow_tag'] = {tag!r}\n    context['result'] = {result}\n")


def tagged_project(folder: Path, **settings) -> Path:
    return write_project(folder, {"nodes": {"h": {"type": "code@1", "module": "verdict"}}},
                         hooks={"verdict": hook("a")}, **settings)


def write_flow(project: Path, nodes: dict) -> None:
    (project / "flow.yaml").write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))


def answer(server, headers: dict | None = None) -> dict:
    response = requests.post(f"{server.url}/analyze_image", data=BODY, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()


def health(server) -> dict:
    return requests.get(f"{server.url}/health").json()


def wait_for(predicate, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def log_entries(server) -> list[dict]:
    return [json.loads(line) for line in server.log_text().splitlines()]


def reload(server, *, failing: bool = False) -> dict:
    """SIGHUP, then the /health of after the reload (which counts good reloads; the log has each failure)."""
    before = health(server).get("reloads", 0)
    failures = sum(1 for entry in log_entries(server) if entry["msg"].startswith("reload failed"))
    server.process.send_signal(signal.SIGHUP)
    if failing:
        wait_for(lambda: sum(1 for entry in log_entries(server) if entry["msg"].startswith("reload failed"))
                 > failures, what="the failed reload's ERROR line")
    else:
        wait_for(lambda: health(server).get("reloads", 0) > before, what="the reload")
    return health(server)


def test_sighup_swaps_in_a_changed_flow_and_hooks_while_every_frame_of_a_burst_answers_200(tmp_path, serve):
    project = tagged_project(tmp_path / "p")
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        server = serve(project, env={"NOTIFY_SOCKET": notify.address})
        first = health(server)
        assert answer(server)["flow_tag"] == "a" and "reloads" not in first
        answers: list[tuple[int, float, float, int, str | None]] = []  # (camera, sent, answered, status, tag)
        stop = threading.Event()

        def camera(index: int) -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    sent = time.monotonic()
                    response = session.post(f"{server.url}/analyze_image", data=BODY)
                    tag = response.json().get("flow_tag") if response.status_code == 200 else None
                    answers.append((index, sent, time.monotonic(), response.status_code, tag))

        cameras = [threading.Thread(target=camera, args=(index,)) for index in range(4)]
        for thread in cameras:
            thread.start()
        try:
            time.sleep(1.0)
            # The new flow names another hook module, whose import takes 1.5 s: the reload prepares it beside the
            # serving flow, and the frames meanwhile keep their pace on the old one.
            (project / "code" / "verdict_b.py").write_text(hook("b", result=False, import_seconds=1.5))
            write_flow(project, {"h": {"type": "code@1", "module": "verdict_b"}})
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGHUP)
            wait_for(lambda: health(server).get("reloads") == 1, what="the reload")
            swapped = time.monotonic()
            time.sleep(1.0)
        finally:
            stop.set()
            for thread in cameras:
                thread.join()
        assert [a for a in answers if a[3] != 200] == []
        assert swapped - signalled >= 1.5
        during = [a for a in answers if signalled <= a[1] and a[2] <= swapped - 0.2]
        assert len(during) >= 20 and {a[4] for a in during} == {"a"}
        assert max(a[2] - a[1] for a in during) < 0.5, "frames waited for the reload"
        # Each camera sees the old flow, then the new one, never the old one again.
        for index in range(4):
            tags = "".join(str(a[4]) for a in answers if a[0] == index)
            assert tags.startswith("a") and tags.endswith("b") and "ba" not in tags, tags
        after = answer(server)
        assert after["flow_tag"] == "b" and after["result"] is False
        now = health(server)
        assert now["status"] == "ready" and now["flow_sha256"] != first["flow_sha256"]
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text  # dashboards see the new flow too
        info = [line for line in metrics.splitlines() if line.startswith("appliance_project_info{")]
        assert len(info) == 1 and f'flow_sha256="{now["flow_sha256"]}"' in info[0] and info[0].endswith(" 1.0")
        assert "reload_failed" not in now and "restart_needed" not in now
        assert requests.get(f"{server.url}/health/ready").status_code == 200
        assert any(entry["msg"].startswith("reload: flow flow.yaml") for entry in log_entries(server))
        # systemd's view: reloading from RELOADING=1 until READY=1 (sd_notify(3)).
        notify.wait_for(lambda: any(m.startswith("RELOADING=1") for _, m in notify.messages))
        after_start = [m.split("\n")[0] for _, m in notify.messages if not m.startswith(("EXTEND", "WATCHDOG"))]
        assert after_start == ["READY=1", "RELOADING=1", "READY=1"]
        assert "\nMONOTONIC_USEC=" in next(m for _, m in notify.messages if m.startswith("RELOADING=1"))
    finally:
        notify.close()


BROKEN = {
    # A typo in the flow file: every problem with its file:line, as `appliance check` says it.
    "flow_typo": ("flow", {"h": {"type": "code@1", "modul": "verdict"}}, "flow.yaml:4",
                  "nodes.h.modul: unknown key"),
    "missing_model": ("flow", {"h": {"type": "code@1", "module": "verdict", "next": ["a"]},
                               "a": {"type": "anomaly@1", "model": "absent"}}, "flow.yaml:",
                      "model 'absent'"),
    "hook_import": ("hook", "import time\nimport no_such_module\n\ndef main(context):\n    pass\n",
                    "code/verdict.py:2", "ModuleNotFoundError: No module named 'no_such_module'"),
    "hook_raises": ("hook", "SETTINGS = {}\nLIMIT = SETTINGS['limit']\n\ndef main(context):\n    pass\n",
                    "code/verdict.py:2", "KeyError"),
    "project_yaml": ("project", "name: test\nflow: flow.yaml\nlimits: {queue_timeout_s: -1}\n", "project.yaml:3",
                     "limits.queue_timeout_s"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_flow_keeps_the_old_one_serving_and_health_says_why_until_a_good_reload(tmp_path, serve, kind):
    project = tagged_project(tmp_path / "p")
    server = serve(project)
    assert answer(server)["flow_tag"] == "a"
    what, content, place, reason = BROKEN[kind]
    if what == "flow":
        write_flow(project, content)
    elif what == "hook":
        (project / "code" / "verdict.py").write_text(content)
    else:
        (project / "project.yaml").write_text(content)
    now = reload(server, failing=True)
    assert place in now["reload_failed"] and reason in now["reload_failed"], now["reload_failed"]
    assert now["status"] == "ready" and requests.get(f"{server.url}/health/ready").status_code == 200
    assert "reloads" not in now
    (error,) = [entry for entry in log_entries(server) if entry["level"] == "ERROR"]
    assert error["msg"].startswith("reload failed, the flow loaded before keeps serving: ")
    assert place in error["msg"] and reason in error["msg"]
    # The old flow, and its hook as it was imported at start, keep answering.
    assert answer(server)["flow_tag"] == "a"
    # Repaired: the next reload serves it and clears the problem.
    tagged_project(project)
    (project / "code" / "verdict.py").write_text(hook("c"))
    now = reload(server)
    assert "reload_failed" not in now and now["reloads"] == 1
    assert answer(server)["flow_tag"] == "c"


def test_settings_fixed_at_start_keep_their_old_values_and_say_they_need_a_restart(tmp_path, serve):
    project = tagged_project(tmp_path / "p", api_key="old-key")
    server = serve(project)
    old_key = {"X-API-Key": "old-key"}
    assert answer(server, old_key)["flow_tag"] == "a"
    tagged_project(project, api_key="new-key", port=1, apis=["pekat", "raypack"],
                   limits={"hook_timeout_s": 3.0, "max_body_bytes": 4096})
    (project / "code" / "verdict.py").write_text(hook("b"))
    now = reload(server)
    assert now["restart_needed"] == ["port", "api_key", "apis", "limits.max_body_bytes"]
    # The flow and the limits read per request are the new ones; the key, the routes, the body limit are not.
    assert answer(server, old_key)["flow_tag"] == "b"
    refused = requests.post(f"{server.url}/analyze_image", data=BODY, headers={"X-API-Key": "new-key"})
    assert refused.status_code == 401
    assert requests.post(f"{server.url}/analyze_image", data=BODY + b"\0" * 5000, headers=old_key).status_code != 413
    assert requests.post(f"{server.url}/getmodels").status_code == 404
    (warning,) = [entry for entry in log_entries(server) if "after a restart" in entry["msg"]]
    assert warning["level"] == "WARNING"
    assert "port, api_key, apis, limits.max_body_bytes" in warning["msg"]


def test_five_reloads_leave_no_thread_memory_or_compiled_model_behind(tmp_path, serve):
    # A flow with a model and a hook: the reloaded flow takes the loaded model as it is (no second compile, no
    # second copy) and the hook threads of the first; the replaced flows are freed.
    nodes = {"h": {"type": "code@1", "module": "verdict", "next": ["roi"]}, **FLOW["nodes"]}
    project = write_project(tmp_path / "p", {"nodes": nodes}, hooks={"verdict": hook("a")}, api_key="k")
    save_red_detector(project / "models")
    server = serve(project)
    headers = {"X-API-Key": "k"}
    red = frame((0, 0, 255))

    def frames(tag: str) -> None:
        with requests.Session() as session:
            for _ in range(30):
                ctx = session.post(f"{server.url}/analyze_image", data=red, headers=headers).json()
                assert ctx["flow_tag"] == tag and ctx["models"][0]["version"] == "1"

    frames("a")
    (project / "code" / "verdict.py").write_text(hook("w"))
    reload(server)  # warm-up: the reload path's own first-time allocations
    frames("w")
    loads = metric(requests.get(f"{server.url}/metrics").text, 'appliance_model_loads_total{model="red"}')
    fds, threads, rss = process_counts(server.process.pid)
    for number in range(5):
        (project / "code" / "verdict.py").write_text(hook(f"r{number}"))
        assert reload(server)["reloads"] == number + 2
        frames(f"r{number}")
    fds_after, threads_after, rss_after = process_counts(server.process.pid)
    assert threads_after == threads
    assert abs(fds_after - fds) <= 2
    assert rss_after - rss < 16 * 1024, f"RSS {rss // 1024} MiB before 5 reloads, {rss_after // 1024} MiB after"
    assert metric(requests.get(f"{server.url}/metrics").text, 'appliance_model_loads_total{model="red"}') == loads
    assert health(server)["models"] == {"red": {"version": "1", "device": "CPU"}}
    # The pointer follower follows the reloaded flow's model: a new version published is served within 2 s.
    save_red_detector(project / "models", "2", threshold=2.0)
    wait_for(lambda: requests.post(f"{server.url}/analyze_image", data=red,
                                   headers=headers).json()["models"][0]["version"] == "2", timeout=8,
             what="version 2 to be served")
    assert health(server)["models"] == {"red": {"version": "2", "device": "CPU"}}


def test_a_reloaded_project_shares_the_loaded_models_and_drops_the_ones_its_flow_no_longer_uses(tmp_path):
    from appliance.project import Project

    nodes = {"h": {"type": "code@1", "module": "verdict", "next": ["roi"]}, **FLOW["nodes"]}
    project_dir = write_project(tmp_path / "p", {"nodes": nodes}, hooks={"verdict": hook("a")})
    save_red_detector(project_dir / "models")
    old = Project.load(project_dir)
    old.prepare()
    try:
        # segment@1 runs its model at the model's own size (it shrinks frames itself): the slot says so.
        slot = old.runtime.slots["red[own size]"]
        # A stored model asked for by name (Deepomatic's public specs) runs on a one-node flow of its own.
        key = old.model_capability("red")
        new, restart_needed = old.reloaded()
        assert restart_needed == []
        assert new.runtime.slots == {"red[own size]": slot} and slot.current is not None
        assert new.runtime.slots["red[own size]"].current is slot.current
        assert key in new.capabilities and new.capabilities[key] is not old.capabilities[key]
        assert new.env.extras["hooks"] is old.env.extras["hooks"]  # the same hook threads
        # `new` serves model:red by name: a flow without the model node keeps that slot, and a project that
        # was never asked for it by name keeps none (its compiled version goes with the project that loaded it).
        plain = Project.load(project_dir)
        plain.prepare()
        write_flow(project_dir, {"h": {"type": "code@1", "module": "verdict"}})
        assert set(new.reloaded()[0].runtime.slots) == {"red[own size]"}
        lean, _ = plain.reloaded()
        assert lean.runtime.slots == {} and lean.node_count == 1
        plain.close()
    finally:
        old.close()


def test_a_sighup_while_the_nodes_are_prepared_reloads_once_the_project_is_ready(tmp_path, serve):
    # The hook's import takes 2 s at start; SIGHUP's default action would end the process.
    project = write_project(tmp_path / "p", {"nodes": {"h": {"type": "code@1", "module": "verdict"}}},
                            hooks={"verdict": hook("a", import_seconds=2.0)})
    server = serve(project, wait_ready=False)
    (project / "code" / "verdict.py").write_text(hook("b"))
    server.process.send_signal(signal.SIGHUP)
    wait_for(lambda: requests.get(f"{server.url}/health").json().get("reloads") == 1, what="the reload after start")
    assert server.process.poll() is None
    assert answer(server)["flow_tag"] == "b"
    assert any("reload requested while starting" in entry["msg"] for entry in log_entries(server))
