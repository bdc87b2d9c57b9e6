"""The testbed's C3PO reference index, built once per setting and cached under ``~/.cache/reroute``.

Retrieval defaults were chosen by measurement (``scripts/testbed_study.py``, ``NOTES.md``): reference prompts carry
the task cue and shifted test prompts do not, so whole-prompt embeddings retrieve neighbours of the wrong domain
(14% domain agreement, chance 12.5%); a lexical bag of the cue-free ``question`` field retrieves the right domain
for 34% of neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reroute.attach import RoutedModel
from reroute.c3po.index import ReferenceIndex
from reroute.testbed.suite import make_split

DEFAULT_EMBEDDER = "lexical"
DEFAULT_QUERY_FIELD = "question"


def cache_folder() -> Path:
    return Path.home() / ".cache" / "reroute"


def reference_index(
    rm: RoutedModel,
    tokenizer: Any,
    n: int = 800,
    seed: int = 0,
    embedder: str = DEFAULT_EMBEDDER,
    query_field: str = DEFAULT_QUERY_FIELD,
    mode: str = "mc",
    cache: bool = True,
    progress: bool = False,
) -> ReferenceIndex:
    """C3PO's index over ``n`` items of the ``reference`` split (resumed from the cache when ``cache``)."""
    name = f"testbed-reference-{n}-seed{seed}-{mode}-{embedder}-{query_field}"
    path = cache_folder() / name if cache else None
    items = make_split("reference", n=n, seed=seed)
    return ReferenceIndex.build(
        rm, tokenizer, items, embedder=embedder, mode=mode, path=path, query_field=query_field, progress=progress
    )
