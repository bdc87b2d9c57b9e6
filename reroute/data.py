"""Items: the one record format every reference set, evaluation and method reads.

An item is a dict with ``prompt`` (str) and a label: ``choices`` (list of continuation strings, each usually
starting with a space) with ``label`` (index of the correct one), and/or ``answer`` (the exact-match
continuation for generation). Optional fields (``domain``, ``id``, ...) are carried along.
Sources: a ``datasets.Dataset``, a JSONL file, or a list of dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Item = dict[str, Any]


def load_items(source: Any) -> list[Item]:
    """Items from a ``datasets.Dataset``, a path to a JSONL file, or an iterable of mappings (validated)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such JSONL file: {path}")
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
    elif isinstance(source, Iterable):
        records = [dict(r) if isinstance(r, Mapping) else r for r in source]
    else:
        raise TypeError(f"cannot read items from {type(source).__name__}; pass a Dataset, a JSONL path or dicts")
    items = [validate_item(r, i) for i, r in enumerate(records)]
    if not items:
        raise ValueError("no items in the source")
    return items


def write_jsonl(items: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write items as JSON lines, validated first, keys sorted (regenerated files diff cleanly), the parent folder
    created; returns the path. The one writer :func:`load_items` reads back."""
    records = [validate_item(item, i) for i, item in enumerate(items)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def validate_item(record: Any, position: int = 0) -> Item:
    """Check one record's fields; an item with no label is an error."""
    if not isinstance(record, Mapping):
        raise TypeError(f"item {position} is a {type(record).__name__}, not a mapping")
    item = dict(record)
    if not isinstance(item.get("prompt"), str) or not item["prompt"]:
        raise ValueError(f"item {position} has no prompt")
    has_choices = "choices" in item and item["choices"] is not None
    if has_choices:
        choices = item["choices"]
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"item {position}: choices must be a list of at least two strings")
        label = item.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ValueError(f"item {position} has no valid label for its {len(choices)} choices")
    if not has_choices and not isinstance(item.get("answer"), str):
        raise ValueError(f"item {position} has no label: give choices + label, or an answer")
    return item


def item_key(item: Item) -> str:
    """Stable identity of an item's content (prompt, choices, label, answer)."""
    content = {k: item.get(k) for k in ("prompt", "choices", "label", "answer")}
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()


def gold_text(item: Item) -> str:
    """The correct continuation: the labelled choice, else the answer."""
    if item.get("choices") is not None and "label" in item:
        return item["choices"][int(item["label"])]
    return item["answer"]
