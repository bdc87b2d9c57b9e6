"""Freeze a model's own weights while routing state is optimised.

Every method here optimises routing state (offsets, mixing logits), never the weights. Weights loaded with
``from_pretrained`` still have ``requires_grad=True``, so without this a backward pass would also compute, and
accumulate in ``.grad``, a gradient for every weight of the network: as much memory again as the model and most of
the backward's work. ``frozen_weights`` switches that off for the duration of an optimisation and restores each
parameter's flag afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``with frozen(params):`` none of ``params`` requires a gradient; each flag restored on exit."""
    thawed = [p for p in params if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


def frozen_weights(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """``with frozen_weights(model):`` no parameter of ``model`` requires a gradient; flags restored on exit."""
    return frozen(model.parameters())
