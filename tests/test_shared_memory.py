"""Shared memory from a camera script of another user (docs/systemd.md, "Camera scripts of another user").

Real processes with real uids: the server runs as `nobody`, with or without the `appliance-cameras` group as the
unit's SupplementaryGroups= gives it, and the camera script runs as a third uid. A block of mode 0600 is refused
with a 403 that says what to do; doing exactly that (group appliance-cameras, mode 0640) makes it readable.
Changing uids needs root; CI runs the suite as root.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from appliance.frames import CAMERA_GROUP
from tests.conftest import REPO, Server, needs_tool, start_server, write_project
from tests.server.test_protocol import part_image

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="runs the server and the camera script as other users, "
                                 "which needs root (CI runs the suite as root)"),
              needs_tool("groupadd", "groupdel", "setpriv")]

SERVER_UID = 65534  # nobody: the appliance's user here
CAMERA_UID = 4711  # the camera script's user: neither the server's nor root
FLOW = {"nodes": {"f": {"type": "flip@1", "direction": "both"}}}


@pytest.fixture(scope="module")
def camera_gid() -> Iterator[int]:
    """The group the install creates (systemd/install.sh); made here if this machine has none, and removed after."""
    try:
        yield grp.getgrnam(CAMERA_GROUP).gr_gid
        return
    except KeyError:
        pass
    subprocess.run(["groupadd", "--system", CAMERA_GROUP], check=True)
    try:
        yield grp.getgrnam(CAMERA_GROUP).gr_gid
    finally:
        subprocess.run(["groupdel", CAMERA_GROUP], check=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every test user can read (pytest's tmp_path is root's, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="appliance-shm-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def serve_as_nobody(shared_dir: Path, monkeypatch) -> Iterator:
    """serve_as_nobody(groups) starts `appliance serve` as uid nobody with these supplementary groups."""
    started: list[Server] = []

    def _serve(groups: list[int]) -> Server:
        project = write_project(shared_dir / f"project{len(started)}", FLOW)
        for path in (project, *project.rglob("*")):
            os.chown(path, SERVER_UID, SERVER_UID)
        popen = subprocess.Popen

        def as_nobody(command, **kwargs):
            return popen([*setpriv(SERVER_UID, groups), *command], **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(subprocess, "Popen", as_nobody)
            server = start_server(project, env={"HOME": str(project)})
        started.append(server)
        assert open(f"/proc/{server.process.pid}/status").read().count(f"Uid:\t{SERVER_UID}\t") == 1
        return server

    yield _serve
    for server in started:
        server.stop()


def setpriv(uid: int, groups: list[int], *caps: str) -> list[str]:
    """The command prefix that runs a program as `uid` (its own gid) with these supplementary groups only."""
    group_option = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    cap_options = [f"--inh-caps=+{','.join(caps)}", f"--ambient-caps=+{','.join(caps)}"] if caps else []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", *group_option, *cap_options]


def as_camera_user(command: list[str], *groups: int) -> subprocess.CompletedProcess:
    # A test machine's interpreter may live where other users cannot read (pyenv under /root, mode 0700): setpriv
    # execs it while still root, but the camera script's Python must exec it again for multiprocessing's resource
    # tracker and find its standard library. CAP_DAC_READ_SEARCH lets the camera user read; the block it creates
    # is still its own, and only its group and mode decide what the server (which has no capability) can read.
    return subprocess.run([*setpriv(CAMERA_UID, list(groups), "dac_read_search"), *command], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


@pytest.fixture
def camera_block() -> Iterator[tuple[shared_memory.SharedMemory, np.ndarray]]:
    """A block as a camera script of user CAMERA_UID leaves it by default: its own, mode 0600."""
    image = part_image(True, 320, 240)
    block = shared_memory.SharedMemory(create=True, size=image.nbytes)
    np.ndarray(image.shape, np.uint8, buffer=block.buf)[:] = image
    os.chown(f"/dev/shm/{block.name}", CAMERA_UID, CAMERA_UID)
    os.chmod(f"/dev/shm/{block.name}", 0o600)
    yield block, image
    block.close()
    block.unlink()


def analyse(server: Server, block: shared_memory.SharedMemory) -> requests.Response:
    return requests.post(f"{server.url}/analyze_image_shared_memory?width=320&height=240&name={block.name}"
                         "&response_type=annotated_image", timeout=30)


def test_a_0600_block_is_403_saying_what_to_do_and_doing_it_makes_it_readable(serve_as_nobody, camera_gid,
                                                                            camera_block):
    server = serve_as_nobody([camera_gid])
    block, image = camera_block
    path = f"/dev/shm/{block.name}"
    answer = analyse(server, block)
    assert answer.status_code == 403
    message = answer.json()["message"]
    assert message == (
        f"shared memory segment '{block.name}' (owner uid {CAMERA_UID}, mode 0600) is not readable by the appliance "
        f"(user nobody, group {CAMERA_GROUP}): the camera script must make it readable by group {CAMERA_GROUP} "
        f"right after creating it, as `chgrp {CAMERA_GROUP} {path} && chmod 0640 {path}` does (docs/systemd.md, "
        "\"Camera scripts of another user\")")
    # The camera user (a member of the group) runs exactly the command the message names.
    fix = re.search(r"`([^`]+)`", message).group(1)
    done = as_camera_user(["sh", "-c", fix], camera_gid)
    assert done.returncode == 0, done.stderr
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (CAMERA_UID, camera_gid, 0o640)
    answer = analyse(server, block)
    assert answer.status_code == 200, answer.text
    flipped = cv2.imdecode(np.frombuffer(answer.content, np.uint8), cv2.IMREAD_COLOR)
    assert flipped.shape == image.shape
    assert np.abs(flipped.astype(int) - image[::-1, ::-1]).mean() < 3  # the flip of the block's pixels (JPEG)


def test_without_the_group_the_403_says_to_give_the_service_the_group(serve_as_nobody, camera_gid, camera_block):
    server = serve_as_nobody([])
    block, _ = camera_block
    path = f"/dev/shm/{block.name}"
    os.chown(path, CAMERA_UID, camera_gid)
    os.chmod(path, 0o640)  # the client did its part, the service lacks the group
    answer = analyse(server, block)
    assert answer.status_code == 403
    assert answer.json()["message"] == (
        f"shared memory segment '{block.name}' (owner uid {CAMERA_UID}, mode 0640) is not readable by the appliance "
        f"(user nobody, not in group {CAMERA_GROUP}): run the camera script as user nobody, or give the service "
        f"SupplementaryGroups={CAMERA_GROUP} and make the block readable by that group, as "
        f"`chgrp {CAMERA_GROUP} {path} && chmod 0640 {path}` does (docs/systemd.md, \"Camera scripts of another "
        "user\")")


def test_camera_loop_of_another_user_shares_its_blocks_with_the_group(serve_as_nobody, camera_gid, shared_dir):
    server = serve_as_nobody([camera_gid])
    images = shared_dir / "images"
    images.mkdir(mode=0o755)
    for index in range(3):
        cv2.imwrite(str(images / f"part{index}.png"), part_image(index == 1, 640 + 64 * index, 480))
    command = [sys.executable, str(REPO / "examples" / "camera_loop.py"), "--source", str(images), "--url",
               server.url, "--as", "shm"]
    before = camera_blocks()
    refused = as_camera_user(command, camera_gid)
    assert refused.returncode == 0, refused.stderr
    assert "done: 0 OK, 0 NG, 3 errors" in refused.stderr
    assert refused.stdout.splitlines()[0].startswith(
        "part0.png: error 403: shared memory segment 'psm_")
    assert f"mode 0600) is not readable by the appliance (user nobody, group {CAMERA_GROUP})" in refused.stdout
    shared = as_camera_user([*command, "--shm-group", CAMERA_GROUP], camera_gid)
    assert shared.returncode == 0, shared.stderr
    assert "done: 3 OK, 0 NG, 0 errors" in shared.stderr, shared.stdout  # a flip flow has no NG
    assert camera_blocks() == before  # the script unlinked its blocks


def camera_blocks() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if os.stat(f"/dev/shm/{name}").st_uid == CAMERA_UID}


def pekat_snippet() -> str:
    """The Python block of docs/systemd.md that a PEKAT client runs before creating its Instance."""
    text = (REPO / "docs" / "systemd.md").read_text()
    blocks = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "SharedMemory.__init__" in block]
    assert len(blocks) == 1, blocks
    return textwrap.dedent(blocks[0])


def test_the_pekat_client_of_another_user_works_with_the_documented_lines(serve_as_nobody, camera_gid):
    server = serve_as_nobody([camera_gid])
    client = (
        "import numpy as np\n"
        "from PekatVisionSDK import Instance\n"
        f"client = Instance(port={server.port}, already_running=True)\n"
        "assert client._can_use_shm\n"
        "for width in (640, 800):  # a new size makes the SDK create a new block\n"
        "    image = np.zeros((480, width, 3), np.uint8)\n"
        "    image[:, : width // 2] = 255\n"
        "    result = client.analyze(image, response_type='context')\n"
        "    print(result.context.get('status', 200), result.context.get('message', ''),\n"
        "          result.context.get('imageShape'))\n")
    without = as_camera_user([sys.executable, "-c", client], camera_gid)
    assert without.returncode == 0, without.stderr
    assert without.stdout.count("403 shared memory segment") == 2, without.stdout
    documented = as_camera_user([sys.executable, "-c", pekat_snippet() + "\n" + client], camera_gid)
    assert documented.returncode == 0, documented.stderr
    assert documented.stdout.splitlines() == ["200  {'height': 480, 'width': 640}",
                                              "200  {'height': 480, 'width': 800}"]
