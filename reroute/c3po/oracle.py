"""The C3PO oracle: optimise each item's pathway on its own gold answer (paper §3, eq. 1–2).

An upper bound for evaluation only — it reads the label. Batched: every row is its own item with its own
mixing logits; the loss is the sum of the rows' negative log-likelihoods, so Adam's element-wise updates make
the batched optimisation identical to optimising each item alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reroute.attach import RoutedModel
from reroute.c3po.pathway import Pathway, core_size, critical_layers, own_pathway
from reroute.scoring import ContinuationBatch, continuation_logprobs


@dataclass
class OracleResult:
    """The best pathway found per item and its cost.

    Attributes:
        pathway: per-item best pathway (lowest gold NLL seen, the base routing included).
        base_nll: ``[B]`` gold-answer NLL under the base routing.
        best_nll: ``[B]`` gold-answer NLL under ``pathway``.
        forward_passes: forward passes run over the batch (the first scores the base routing).
        backward_passes: backward passes run over the batch.
    """

    pathway: Pathway
    base_nll: torch.Tensor
    best_nll: torch.Tensor
    forward_passes: int
    backward_passes: int


def base_scores(rm: RoutedModel, batch: ContinuationBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per-expert routing scores ``{layer: [B, E]}`` at each row's last prompt token, under the current routing."""
    with torch.no_grad(), rm.trace() as trace:
        continuation_logprobs(rm.model, batch)
    column = batch.prompt_len - 1
    return {layer: trace.scores(layer)[:, column] for layer in layers}


def optimise_oracle(
    rm: RoutedModel,
    gold: ContinuationBatch,
    layers: int | float | Sequence[int] = 5,
    core_experts: int | float = 20,
    steps: int = 20,
    lr: float = 0.1,
) -> OracleResult:
    """Optimise the mixing logits of the critical layers at the last prompt token on each row's gold continuation.

    ``gold``: one row per item, prompt + gold answer. Returns the best pathway per item (never worse than the
    base routing on the gold NLL, since the starting point is the base routing itself).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (lr > 0 and lr < float("inf")):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    chosen = critical_layers(rm, layers)
    n_core = core_size(rm.num_experts, core_experts)
    device = rm.layer(chosen[0]).device
    gold = gold.to(device)
    pathway = own_pathway(base_scores(rm, gold, chosen), chosen, n_core)
    params = {layer: pathway.logits[layer].clone().requires_grad_() for layer in chosen}
    working = Pathway(chosen, pathway.experts, params)
    positions = gold.last_prompt_positions
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    best = pathway.detached()
    best_nll = torch.full((gold.input_ids.shape[0],), float("inf"))
    base_nll = None
    forwards = backwards = 0
    try:
        working.apply(rm, positions)
        for step in range(steps + 1):
            with torch.set_grad_enabled(step < steps):
                nll = -continuation_logprobs(rm.model, gold)
            forwards += 1
            current = nll.detach().float().cpu()
            if base_nll is None:
                base_nll = current.clone()
            improved = current < best_nll
            if improved.any():
                best_nll = torch.where(improved, current, best_nll)
                for layer in chosen:
                    best.logits[layer][improved] = params[layer].detach()[improved.to(device)]
            if step == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            nll.sum().backward()
            backwards += 1
            optimizer.step()
    finally:
        rm.clear_mixing(chosen)
    return OracleResult(best, base_nll, best_nll, forwards, backwards)
