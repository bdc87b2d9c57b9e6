"""The testbed's C3PO reference index, built once per setting and cached under ``~/.cache/reroute``.

Retrieval defaults were chosen by measurement (``scripts/testbed_study.py``, ``NOTES.md``): reference prompts carry
the task cue and shifted test prompts do not, so whole-prompt embeddings retrieve neighbours of the wrong domain
(14% domain agreement, chance 12.5%); a lexical bag of the cue-free ``question`` field retrieves the right domain
for 34% of neighbours.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from reroute.attach import RoutedModel
from reroute.c3po.index import ReferenceIndex
from reroute.testbed.suite import make_split

DEFAULT_EMBEDDER = "lexical"
DEFAULT_QUERY_FIELD = "question"


def cache_folder() -> Path:
    return Path.home() / ".cache" / "reroute"


def fingerprint_key(rm: RoutedModel) -> str:
    """A short hash of the model's architecture fingerprint: caches of one model never serve another."""
    return hashlib.sha256(json.dumps(rm.fingerprint(), sort_keys=True).encode()).hexdigest()[:10]


def is_testbed(rm: RoutedModel) -> bool:
    """Whether ``rm``'s architecture is the shipped testbed's (its config, read without loading weights)."""
    from reroute.testbed.model import checkpoint_path

    config = json.loads((checkpoint_path() / "config.json").read_text())
    mine = rm.fingerprint()
    return (
        mine["model_type"] == config["model_type"]
        and mine["num_hidden_layers"] == config["num_hidden_layers"]
        and mine["hidden_size"] == config["hidden_size"]
        and set(mine["num_experts"]) == {config["num_experts"]}
        and set(mine["top_k"]) == {config["num_experts_per_tok"]}
        and rm.model.config.vocab_size == config["vocab_size"]
    )


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
    """C3PO's index over ``n`` items of the ``reference`` split (resumed from the cache when ``cache``; the cache is
    keyed by the model's fingerprint, the embedder and the query field). Refuses a model that is not the testbed:
    the testbed's reference items mean nothing to another model."""
    if not is_testbed(rm):
        raise ValueError(
            "the testbed's reference index is for the testbed model only; for this model pass a reference index "
            "folder (index=..., --index) or reference items to build one from (--reference FILE)"
        )
    name = f"testbed-reference-{n}-seed{seed}-{mode}-{embedder}-{query_field}-{fingerprint_key(rm)}"
    path = cache_folder() / name if cache else None
    items = make_split("reference", n=n, seed=seed)
    return ReferenceIndex.build(
        rm, tokenizer, items, embedder=embedder, mode=mode, path=path, query_field=query_field, progress=progress
    )
