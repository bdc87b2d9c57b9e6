"""The C3PO oracle: optimise each item's pathway on its own gold answer (paper §3, eq. 1–2).

An upper bound for evaluation only — it reads the label. It is NGD with each item as its own single neighbour
(kernel weight 1): Adam on the mixing logits of the critical layers at the last prompt token, keeping the best
iterate per item. Rows are independent, so one batch equals per-item runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reroute.attach import RoutedModel
from reroute.c3po.embed import ColumnScores
from reroute.c3po.pathway import core_size, critical_layers, own_pathway
from reroute.c3po.surrogates import SurrogateResult, neighbourhood_gd
from reroute.scoring import ContinuationBatch, continuation_logprobs


def base_scores(rm: RoutedModel, batch: ContinuationBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per-expert routing scores ``{layer: [B, E]}`` at each row's last prompt token, under the current routing
    (only that column is recorded)."""
    recorder = ColumnScores(batch.prompt_len - 1)
    with torch.no_grad(), rm._recording(recorder):
        continuation_logprobs(rm.model, batch)
    return {layer: recorder.scores(layer) for layer in layers}


def optimise_oracle(
    rm: RoutedModel,
    gold: ContinuationBatch,
    layers: int | float | Sequence[int] = 5,
    core_experts: int | float = 20,
    steps: int = 20,
    lr: float = 0.1,
    recompute: str = "suffix",
) -> SurrogateResult:
    """Optimise each row's pathway on its own gold continuation (``gold``: one row per item, prompt + answer).

    ``loss_before``/``loss_after`` are the gold NLL under the base routing and under the returned pathway; the
    start is the base routing itself, so the result is never worse on the gold NLL. ``recompute``: what each step
    recomputes (see :data:`reroute.c3po.surrogates.RECOMPUTE`).
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not (lr > 0 and lr < float("inf")):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    chosen = critical_layers(rm, layers)
    gold = gold.to(rm.model.device)  # inputs go where the model takes them (its first device under a device map)
    own = own_pathway(base_scores(rm, gold, chosen), chosen, core_size(rm.num_experts, core_experts))
    weights = torch.ones(gold.input_ids.shape[0], 1)
    try:
        return neighbourhood_gd(rm, own, gold, weights, gold.last_prompt_positions[:1], steps, lr, recompute=recompute)
    finally:
        rm.clear_mixing(chosen)
