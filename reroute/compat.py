"""What differs between the supported transformers releases (5.17 to 5.25), in one place.

* The KV cache's keyword: ``past_key_values`` in 5.17, ``cache`` from 5.24 (model calls, ``generate()``'s model
  kwargs and its output).
* The experts implementation: a config attribute in every release; a public model setter only from 5.24.
* A ``DynamicCache`` made from given keys and values copies each of them (its layers concatenate them onto an empty
  tensor): :func:`cache_holding` makes one that holds them as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache
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


def cache_holding(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A ``DynamicCache`` whose layers hold these keys and values (``[B, kv_heads, columns, head_dim]`` per layer)
    without copying them: the constructor would concatenate each onto an empty tensor, a copy of the whole prefix
    per layer each time a cache is made from it (every optimisation step of C3PO's suffix recompute). Later updates
    concatenate onto them as usual, so the given tensors are never written to."""
    cache = DynamicCache([(keys[..., :0, :], values[..., :0, :]) for keys, values in kv])
    for layer, (keys, values) in zip(cache.layers, kv):
        layer.keys, layer.values = keys, values
    return cache
