"""Which routing C3PO optimises: critical layers, core experts, and the re-mixing state per item.

C3PO (arXiv 2504.07964) §3.5: only the last prompt token's routing weights, in the last few MoE layers
("critical layers", default 5), over each item's top-n experts by the router's own ranking ("core experts",
default 20 of OLMoE's 64) are free variables. The weights are parametrised as mixing logits over the core, so
``softmax`` keeps them a distribution and gradients reach every core expert.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reroute.attach import RoutedModel
from reroute.routing.layer import Mixing

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A ``UserWarning`` the first time ``message`` comes up in this process (C3PO objects are made per call)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def critical_layers(rm: RoutedModel, spec: int | float | Sequence[int]) -> list[int]:
    """Decoder-layer indices of the critical layers.

    ``spec``: an int ``n`` (the last ``n`` MoE layers, or all of them if fewer), a float in (0, 1] (that
    fraction of the MoE layers, at least one, counted from the end) or an explicit list of MoE layer indices.
    """
    layers = rm.moe_layers
    if isinstance(spec, bool):
        raise TypeError("critical layers must be an int, a fraction or a list of layer indices")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"critical layers: need at least one, got {spec}")
        if spec > len(layers):  # a model with fewer MoE layers uses all of them
            _warn_once(f"critical_layers={spec} exceeds the model's {len(layers)} MoE layers; using all of them")
        return layers[-spec:]
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"critical layer fraction must be in (0, 1], got {spec}")
        return layers[-max(1, round(spec * len(layers))) :]
    chosen = sorted({int(i) for i in spec})
    for idx in chosen:
        rm.layer(idx)  # raises for a layer that is not an MoE layer
    if not chosen:
        raise ValueError("critical layers: empty list")
    return chosen


def core_size(num_experts: int, spec: int | float) -> int:
    """Number of core experts: an int (capped at ``num_experts``), or a fraction of ``num_experts`` (at least one)."""
    if isinstance(spec, bool):
        raise TypeError("core experts must be an int or a fraction")
    if isinstance(spec, float):
        if not 0.0 < spec <= 1.0:
            raise ValueError(f"core expert fraction must be in (0, 1], got {spec}")
        return max(1, round(spec * num_experts))
    if spec < 1:
        raise ValueError(f"core experts: need at least one, got {spec}")
    if spec > num_experts:  # a layer with fewer experts uses all of them
        _warn_once(f"core_experts={spec} exceeds the model's {num_experts} experts per layer; using all of them")
    return min(int(spec), num_experts)


@dataclass
class Pathway:
    """Per-item re-mixing state over the critical layers.

    Attributes:
        layers: critical decoder-layer indices.
        experts: ``{layer: [B, C]}`` core expert indices per item.
        logits: ``{layer: [B, C]}`` mixing logits (float32); ``softmax`` gives the core's mixture ω.
    """

    layers: list[int]
    experts: dict[int, torch.Tensor]
    logits: dict[int, torch.Tensor]

    @property
    def rows(self) -> int:
        return next(iter(self.experts.values())).shape[0]

    def omega(self, layer: int) -> torch.Tensor:
        """Mixture over the core ``[B, C]``."""
        return torch.softmax(self.logits[layer].float(), dim=-1)

    def detached(self) -> Pathway:
        return Pathway(
            list(self.layers),
            {k: v.detach().clone() for k, v in self.experts.items()},
            {k: v.detach().clone() for k, v in self.logits.items()},
        )

    def select(self, rows: torch.Tensor | Sequence[int]) -> Pathway:
        """The pathway of a subset of items (``rows`` indices or bool mask)."""
        rows = torch.as_tensor(rows)
        return Pathway(
            list(self.layers),
            {k: v[rows] for k, v in self.experts.items()},
            {k: v[rows] for k, v in self.logits.items()},
        )

    def to(self, device: torch.device | str) -> Pathway:
        """The same pathway with every tensor on ``device``."""
        return Pathway(
            list(self.layers),
            {k: v.to(device) for k, v in self.experts.items()},
            {k: v.to(device) for k, v in self.logits.items()},
        )

    def to_layers(self, rm: RoutedModel) -> Pathway:
        """The same pathway with each layer's tensors where that layer routes (a no-op where they are)."""
        return Pathway(
            list(self.layers),
            {k: v.to(rm.layer(k).device) for k, v in self.experts.items()},
            {k: v.to(rm.layer(k).device) for k, v in self.logits.items()},
        )

    def install(self, rm: RoutedModel, positions: torch.Tensor) -> None:
        """Like :meth:`apply` without validation or copies, for optimisation loops: the tensors must already be
        where each layer routes (:meth:`to_layers`), ``experts`` long ``[B, C]`` or ``[1, C]``, ``logits`` float of
        the same shape, ``positions`` long ``[B, n]`` or ``[1, n]`` (no host sync, no graph break)."""
        for layer in self.layers:
            target = rm.layer(layer)
            target.mixing = Mixing(self.experts[layer], self.logits[layer], positions.to(target.device))

    def apply(self, rm: RoutedModel, positions: torch.Tensor) -> None:
        """Install the re-mixing on ``rm`` at ``positions`` (``[B, n]`` absolute positions, or ``[1, n]``)."""
        for layer in self.layers:
            device = rm.layer(layer).device
            rm.set_mixing(
                layer,
                experts=self.experts[layer].to(device),
                positions=positions.to(device),
                logits=self.logits[layer].to(device),
            )


def own_pathway(scores: dict[int, torch.Tensor], layers: Sequence[int], n_core: int) -> Pathway:
    """The router's own routing as a pathway: core = top-``n_core`` experts by score, logits = log of their
    normalised scores (so applying it reproduces the original routing).

    ``scores``: ``{layer: [B, E]}`` per-expert routing scores at the re-mixed token.
    """
    experts, logits = {}, {}
    for layer in layers:
        top = scores[layer].float().topk(n_core, dim=-1)
        experts[layer] = top.indices
        logits[layer] = top.values.clamp(min=1e-30).log()
    return Pathway(list(layers), experts, logits)
