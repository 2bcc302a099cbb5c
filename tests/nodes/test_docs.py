"""docs/nodes.md is generated from the node settings models (appliance/nodes/docs.py) and must be current; the
registry's settings models are the ones its implementations run with (issue 16, item 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.nodes import NODE_TYPES
from appliance.nodes.docs import DEFAULT_PATH, block, own_fields, render
from tests.conftest import REPO


def test_docs_nodes_md_is_what_the_generator_writes() -> None:
    text = DEFAULT_PATH.read_text(encoding="utf-8")
    assert render(text) == text, "docs/nodes.md is not current: run python -m appliance.nodes.docs"
    done = subprocess.run([sys.executable, "-m", "appliance.nodes.docs", "--check"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_setting_changed_in_its_model_makes_the_check_fail(tmp_path: Path) -> None:
    stale = tmp_path / "nodes.md"
    stale.write_text(DEFAULT_PATH.read_text(encoding="utf-8").replace(
        "| `min_area` | integer ≥ 0 | `16` | smallest region reported", "| `min_area` | integer ≥ 0 | `8` | smallest "
        "region reported", 1))
    done = subprocess.run([sys.executable, "-m", "appliance.nodes.docs", "--check", str(stale)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert (done.returncode, done.stderr) == (1, f"{stale} is not current: run python -m appliance.nodes.docs\n")
    done = subprocess.run([sys.executable, "-m", "appliance.nodes.docs", str(stale)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0 and stale.read_text(encoding="utf-8") == DEFAULT_PATH.read_text(encoding="utf-8")


def test_a_node_type_without_its_part_is_named() -> None:
    text = DEFAULT_PATH.read_text(encoding="utf-8").replace("<!-- settings: ocr@1 -->", "<!-- ocr@1 -->")
    with pytest.raises(ValueError, match=r"no part for ocr@1: add `<!-- settings: TYPE -->`"):
        render(text)


@pytest.mark.parametrize("tag", list(NODE_TYPES))
def test_every_setting_of_every_node_type_is_described(tag: str) -> None:
    node_type = NODE_TYPES[tag]
    assert node_type.implementation.settings_model is node_type.settings_model
    model = node_type.settings_model
    assert model.__doc__, f"{tag}: its settings model has no docstring"
    undescribed = [name for name, info in own_fields(model).items() if not info.description]
    assert undescribed == [], f"{tag}: settings without a description: {undescribed}"
    assert f"<!-- settings: {tag} -->\n{block(tag)}<!-- end settings -->" in DEFAULT_PATH.read_text(encoding="utf-8")
