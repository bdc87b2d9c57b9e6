"""One adaptation phase of continuous rerouting (arXiv 2510.14853 §3.2–3.3).

Per-sequence additive router-logit vectors δ ``[B, L_sel, E]`` (one ``[E]`` vector per selected MoE layer and
batch row, shared over positions) are optimised for a few steps on the next-token loss of the row's own context
(prompt + text generated so far, padding masked). Rows are independent: the loss is a sum over rows and Adam is
element-wise, so a batch adapts exactly as its rows would alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reroute.attach import RoutedModel
from reroute.frozen import frozen_weights
from reroute.prefix import PrefixCache
from reroute.rerouting.config import RerouterConfig
from reroute.scoring import next_token_logprobs, padded_logits


def context_loss(rm: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean next-token NLL over the context ``[B]`` (padding and the first token excluded)."""
    nll = -next_token_logprobs(rm.model, input_ids, attention_mask)
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def routing_confidence(rm: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, float]:
    """The paper's per-layer score C_i = -mean over tokens and selected experts of log p(expert), ``{layer: C_i}``.

    High C_i means the router puts *little* probability on its choices (low confidence) — the inconsistency
    reviewers noted; ``RerouterConfig.prefer`` makes the direction explicit.
    """
    with torch.no_grad(), rm.trace() as trace:
        padded_logits(rm.model, input_ids, attention_mask)
    mask = attention_mask.bool().cpu()
    scores = {}
    for layer in rm.moe_layers:
        probs = trace.scores(layer)
        probs = probs / probs.sum(-1, keepdim=True)  # sigmoid-scored families: normalise to a distribution
        chosen = probs.gather(-1, trace.indices(layer).clamp(min=0))[..., : rm.layer(layer).top_k]
        scores[layer] = float(-chosen.clamp(min=1e-30).log().mean(-1)[mask].mean())
    return scores


def select_layers(rm: RoutedModel, config: RerouterConfig, confidence: dict[int, float] | None) -> dict[int, float]:
    """``{layer: gradient weight}`` of the layers adapted in this phase."""
    if not isinstance(config.layers, str):
        chosen = sorted({int(i) for i in config.layers})
        for idx in chosen:
            rm.layer(idx)  # a clear error for a layer that is not an MoE layer
        return {idx: 1.0 for idx in chosen}
    if config.layers == "all":
        return {idx: 1.0 for idx in rm.moe_layers}
    assert confidence is not None
    sign = 1.0 if config.prefer == "uncertain" else -1.0
    if config.selection == "hard":
        count = max(1, round(config.ratio * len(confidence)))
        ranked = sorted(confidence, key=lambda i: -sign * confidence[i])[:count]
        return {idx: 1.0 for idx in sorted(ranked)}
    values = torch.tensor([sign * confidence[i] for i in rm.moe_layers])
    weights = torch.softmax(values / values.std().clamp(min=1e-6), 0) * len(values)
    return dict(zip(rm.moe_layers, weights.tolist()))


@dataclass
class PhaseResult:
    """Outcome of one phase: the new δ ``[B, L_sel, E]``, the context loss before and after ``[B]``, cost."""

    delta: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    forward_passes: int
    backward_passes: int
    rolled_back: bool


def install_row_offsets(rm: RoutedModel, order: Sequence[int], delta: torch.Tensor) -> None:
    """Set ``delta [B, L_sel, E]`` as the per-row offsets of the layers ``order``, each slice on its layer's device
    (a model spread over devices keeps δ in one place; ``.to`` is differentiable, so gradients reach δ)."""
    rm.set_row_offsets({idx: delta[:, j].to(rm.layer(idx).device) for j, idx in enumerate(order)})


@torch.enable_grad()  # generate() runs under no_grad; a phase needs gradients whatever the caller's mode
def adapt_phase(
    rm: RoutedModel,
    config: RerouterConfig,
    layers: dict[int, float],
    delta: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> PhaseResult:
    """Run ``config.steps`` Adam steps on ``delta [B, L_sel, E]`` (updated in place on success).

    A step whose loss is not finite is rolled back: δ returns to the last good value with a warning.
    The loss of the final δ is measured by one more forward (no gradient).
    """
    order = list(layers)
    weights = torch.tensor([layers[i] for i in order], device=delta.device)[None, :, None]
    param = delta.detach().clone().requires_grad_()
    optimizer = torch.optim.Adam([param], lr=config.lr)
    last_good = param.detach().clone()
    install_row_offsets(rm, order, param)
    forwards = backwards = 0
    rolled_back = False
    before = None
    first_layer = min(order) if config.reuse_prefix else 0
    run = lambda: context_loss(rm, input_ids, attention_mask)
    with frozen_weights(rm.model), PrefixCache(rm, first_layer, run):
        for _ in range(config.steps):
            loss = context_loss(rm, input_ids, attention_mask)
            forwards += 1
            if before is None:
                before = loss.detach().cpu()
            if not torch.isfinite(loss).all():
                rolled_back = True
                break
            total = loss.sum() + config.l2 * param.pow(2).sum().to(loss.device)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            backwards += 1
            param.grad.mul_(weights)  # soft selection: per-layer gradient weights (1 for hard/all)
            last_good = param.detach().clone()
            optimizer.step()
            if config.max_norm is not None:
                with torch.no_grad():
                    norms = param.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                    param.mul_(torch.clamp(config.max_norm / norms, max=1.0))
        with torch.no_grad():
            after = context_loss(rm, input_ids, attention_mask).cpu()
            forwards += 1
        if not torch.isfinite(after).all():
            rolled_back = True
            with torch.no_grad():
                param.copy_(last_good)
                after = context_loss(rm, input_ids, attention_mask).cpu()
            forwards += 1
    if rolled_back:
        warnings.warn(
            "rerouting: the context loss became NaN/inf; δ was rolled back to its last finite value", stacklevel=3
        )
    with torch.no_grad():
        delta.copy_(param)
    install_row_offsets(rm, order, delta)
    return PhaseResult(delta, before if before is not None else after, after, forwards, backwards, rolled_back)
