"""Every Python block of README.md runs as written (issue 14 item 23).

Each ```python block runs in a fresh namespace, in a temporary working directory, as a reader would paste it into
a new session: blocks do not share names, so each one is self-contained (on the shipped testbed or a tiny model).
A block that cannot run here (it downloads a checkpoint from the hub) carries the marker line
``<!-- readme-test: skip (why) -->`` right above its fence, and the marker must say why.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
SKIP = re.compile(r"<!-- readme-test: skip \((?P<why>[^)]+)\) -->\s*$")


def python_blocks(text: str) -> list[tuple[str, int, str, str | None]]:
    """``(section heading, line number, code, skip reason or None)`` for each ```python block of ``text``."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        line = before.count("\n") + 1
        headings = re.findall(r"^#+ (.+)$", before, re.M)
        marker = SKIP.search(before.rstrip("\n").rsplit("\n", 1)[-1])
        blocks.append((headings[-1] if headings else "top", line, match.group(1), marker and marker["why"]))
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_blocks_are_found():
    assert len(BLOCKS) >= 5, "the README's python blocks were not found"
    assert all(why is None or why.strip() for *_, why in BLOCKS)


@pytest.mark.parametrize(("section", "line", "code", "skip"), BLOCKS, ids=[f"L{b[1]}-{b[0][:24]}" for b in BLOCKS])
def test_readme_block_runs(section, line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"README.md line {line} ({section}): {skip}")
    monkeypatch.chdir(tmp_path)
    # a real module, as a pasted session has one: dataclasses and pickling look their class's module up
    module = types.ModuleType("__readme__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, f"README.md:{line}", "exec"), module.__dict__)
