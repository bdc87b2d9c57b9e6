"""What differs between the supported transformers releases (5.17 to 5.25), in one place.

* The KV cache's keyword: ``past_key_values`` in 5.17, ``cache`` from 5.24 (model calls, ``generate()``'s model
  kwargs and its output).
* The experts implementation: a config attribute in every release; a public model setter only from 5.24.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from transformers.generation.utils import ALL_CACHE_NAMES, GenerateDecoderOnlyOutput

CACHE_NAMES: tuple[str, ...] = tuple(ALL_CACHE_NAMES)
"""Every name the KV cache goes by, newest first."""

CACHE_KWARG: str = ALL_CACHE_NAMES[0]
"""The model-call keyword of the KV cache in the installed release."""

OUTPUT_CACHE_FIELD: str = next(
    f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput) if f.name in ALL_CACHE_NAMES
)
"""The field of ``generate()``'s output that holds the cache."""


def find_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache among a call's keyword arguments, under whichever name it was passed (``None``: none)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def set_experts_implementation(config: Any, name: str | None) -> None:
    """Choose the experts implementation of one config (and so of the experts modules reading it). Per config,
    so that nested configs keep their own choice; 5.17 has no public setter for this."""
    config._experts_implementation_internal = name
