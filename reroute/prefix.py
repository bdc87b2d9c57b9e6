"""Reuse of the layers below the first adapted layer across optimisation steps.

C3PO (critical layers) and rerouting (selected layers) change routing only from some layer on, so the hidden states
entering that layer do not depend on the state being optimised. ``PrefixCache`` runs the batch once, keeps those
hidden states, and while active replaces the decoder layers below with pass-throughs that hand the cached states on:
each optimisation step then pays only for the critical suffix of the network (plus embeddings, masks and the head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reroute.attach import RoutedModel


class _PassThrough(nn.Module):
    """Stands in for a decoder layer: returns the cached output (last prefix layer) or its input unchanged."""

    def __init__(self, cached: Any = None, as_tuple: bool = False) -> None:
        super().__init__()
        self.cached, self.as_tuple = cached, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.cached is not None:
            return self.cached
        return (hidden_states,) if self.as_tuple else hidden_states


def decoder_layers(rm: RoutedModel) -> nn.ModuleList:
    """The ``layers`` module list of the model's decoder stack."""
    for name, module in rm.model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > max(rm.moe_layers):
            return module
    raise RuntimeError("could not find the decoder's `layers` module list")


class PrefixCache:
    """``with PrefixCache(rm, first_layer, run_batch):`` — inside, forwards of the same batch skip the layers
    below ``first_layer``.

    ``run_batch`` is a callable running the model on the batch (it is called once, without gradients, to record
    the hidden states entering ``first_layer``).
    """

    def __init__(self, rm: RoutedModel, first_layer: int, run_batch: Any) -> None:
        self.layers = decoder_layers(rm)
        self.first_layer = first_layer
        self.run_batch = run_batch
        self.saved: list[nn.Module] = []

    def __enter__(self) -> PrefixCache:
        if self.first_layer == 0:
            return self
        captured: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            captured["output"] = output

        handle = self.layers[self.first_layer - 1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.run_batch()
        finally:
            handle.remove()
        output = captured["output"]
        as_tuple = isinstance(output, tuple)
        cached = tuple(o.detach() if torch.is_tensor(o) else o for o in output) if as_tuple else output.detach()
        self.saved = [self.layers[i] for i in range(self.first_layer)]
        for i in range(self.first_layer - 1):
            self.layers[i] = _PassThrough(as_tuple=as_tuple)
        self.layers[self.first_layer - 1] = _PassThrough(cached=cached, as_tuple=as_tuple)
        return self

    def __exit__(self, *exc: object) -> None:
        for i, layer in enumerate(self.saved):
            self.layers[i] = layer
        self.saved = []
