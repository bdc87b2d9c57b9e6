"""One adaptation phase of continuous rerouting (arXiv 2510.14853 §3.2–3.3).

Per-sequence additive router-logit vectors δ ``[B, L_sel, E]`` (one ``[E]`` vector per selected MoE layer and
batch row, shared over positions) are optimised for a few steps on the next-token loss of the row's own context
(prompt + text generated so far, padding masked). Rows are independent: the loss is a sum over rows and Adam is
element-wise, so a batch adapts exactly as its rows would alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from reroute.attach import RoutedModel
from reroute.frozen import frozen, frozen_weights
from reroute.prefix import PrefixCache, compile_step
from reroute.rerouting.config import RerouterConfig
from reroute.routing.layer import expand_rows
from reroute.scoring import next_token_logprobs, padded_logits


def context_loss(rm: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean next-token NLL over the context ``[B]`` (padding and the first token excluded)."""
    nll = -next_token_logprobs(rm.model, input_ids, attention_mask)
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def routing_confidence(
    rm: RoutedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_row: bool = False
) -> dict[int, float] | dict[int, torch.Tensor]:
    """The paper's per-layer score C_i = -mean over tokens and selected experts of log p(expert), ``{layer: C_i}``:
    over the whole batch (a float), or with ``per_row=True`` for each row over its own tokens (``[B]``, CPU), so
    that a row's layer selection does not depend on its batch-mates.

    High C_i means the router puts *little* probability on its choices (low confidence) — the inconsistency
    reviewers noted; ``RerouterConfig.prefer`` makes the direction explicit.
    """
    with torch.no_grad(), rm.trace() as trace:
        padded_logits(rm.model, input_ids, attention_mask)
    mask = attention_mask.bool().cpu()
    scores: dict[int, float] | dict[int, torch.Tensor] = {}
    for layer in rm.moe_layers:
        probs = trace.scores(layer)
        probs = probs / probs.sum(-1, keepdim=True)  # sigmoid-scored families: normalise to a distribution
        chosen = probs.gather(-1, trace.indices(layer).clamp(min=0))[..., : rm.layer(layer).top_k]
        per_token = -chosen.clamp(min=1e-30).log().mean(-1).cpu()  # [B, S]
        if per_row:
            scores[layer] = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        else:
            scores[layer] = float(per_token[mask].mean())
    return scores


def select_layers(
    rm: RoutedModel, config: RerouterConfig, confidence: dict[int, float] | dict[int, torch.Tensor] | None
) -> dict[int, float] | dict[int, torch.Tensor]:
    """``{layer: gradient weight}`` of the layers adapted in this phase. With per-row confidence (``[B]`` per layer,
    see :func:`routing_confidence`) each row selects its own layers: the weights are then ``[B]`` (hard selection:
    1 where the row adapts the layer, 0 elsewhere; a layer no row selects is left out)."""
    if not isinstance(config.layers, str):
        chosen = sorted({int(i) for i in config.layers})
        for idx in chosen:
            rm.layer(idx)  # a clear error for a layer that is not an MoE layer
        return {idx: 1.0 for idx in chosen}
    if config.layers == "all":
        return {idx: 1.0 for idx in rm.moe_layers}
    assert confidence is not None
    sign = 1.0 if config.prefer == "uncertain" else -1.0
    if isinstance(next(iter(confidence.values())), torch.Tensor):
        return _select_per_row(rm, config, confidence, sign)
    if config.selection == "hard":
        count = max(1, round(config.ratio * len(confidence)))
        ranked = sorted(confidence, key=lambda i: -sign * confidence[i])[:count]
        return {idx: 1.0 for idx in sorted(ranked)}
    values = torch.tensor([sign * confidence[i] for i in rm.moe_layers])
    weights = torch.softmax(values / values.std().clamp(min=1e-6), 0) * len(values)
    return dict(zip(rm.moe_layers, weights.tolist()))


def _select_per_row(
    rm: RoutedModel, config: RerouterConfig, confidence: dict[int, torch.Tensor], sign: float
) -> dict[int, torch.Tensor]:
    """:func:`select_layers` for per-row confidence: each row ranks the layers by its own C_i, exactly as a batch
    of that row alone would."""
    values = torch.stack([sign * confidence[i].float() for i in rm.moe_layers], dim=1)  # [B, L]
    if config.selection == "soft":
        weights = torch.softmax(values / values.std(dim=1, keepdim=True).clamp(min=1e-6), 1) * values.shape[1]
        return {idx: weights[:, j] for j, idx in enumerate(rm.moe_layers)}
    count = max(1, round(config.ratio * values.shape[1]))
    # a stable sort: ties go to the lower layer, as sorted() does for a single row
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :count]
    chosen = torch.zeros_like(values).scatter_(1, order, 1.0)
    return {idx: chosen[:, j] for j, idx in enumerate(rm.moe_layers) if bool(chosen[:, j].any())}


@dataclass
class PhaseResult:
    """Outcome of one phase: the new δ ``[B, L_sel, E]``, the context loss before and after ``[B]``, cost."""

    delta: torch.Tensor
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    forward_passes: int
    backward_passes: int
    rolled_back: bool


def row_offsets_of(
    rm: RoutedModel,
    order: Sequence[int],
    delta: torch.Tensor,
    base: Mapping[int, torch.Tensor | None] | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: [B, E]}`` row offsets that put ``delta [B, L_sel, E]`` on the layers ``order``, each slice on its
    layer's device (a model spread over devices keeps δ in one place; ``.to`` is differentiable, so gradients reach
    δ). ``base`` holds row offsets set before (``[R, E]`` per layer, ``R`` dividing ``B``): δ is added to them
    (without a gradient to them)."""
    values = {}
    for j, idx in enumerate(order):
        value = delta[:, j].to(rm.layer(idx).device)
        previous = None if base is None else base.get(idx)
        if previous is not None:
            rows, copies = value.shape[0], max(value.shape[0] // previous.shape[0], 1)
            value = value + expand_rows(previous.detach(), rows, "row offsets", expansion=copies).to(value.dtype)
        values[idx] = value
    return values


def install_row_offsets(
    rm: RoutedModel,
    order: Sequence[int],
    delta: torch.Tensor,
    base: Mapping[int, torch.Tensor | None] | None = None,
    checked: bool = True,
) -> None:
    """Set ``delta [B, L_sel, E]`` (plus ``base``, see :func:`row_offsets_of`) as the per-row offsets of the layers
    ``order``: through the validating ``rm.set_row_offsets``, or with ``checked=False`` straight onto the layers,
    for optimisation loops (as C3PO's ``Pathway.install``): no validation, so no host sync and no graph break; δ
    must be a finite float tensor of the layers' expert count made by the loop itself."""
    values = row_offsets_of(rm, order, delta, base)
    if checked:
        rm.set_row_offsets(values)
        return
    for idx, value in values.items():
        rm.layer(idx).row_offsets = value


@torch.enable_grad()  # generate() runs under no_grad; a phase needs gradients whatever the caller's mode
def adapt_phase(
    rm: RoutedModel,
    config: RerouterConfig,
    layers: Mapping[int, float | torch.Tensor],
    delta: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    base: Mapping[int, torch.Tensor | None] | None = None,
) -> PhaseResult:
    """Run ``config.steps`` Adam steps on ``delta [B, L_sel, E]`` (updated in place on success).

    ``layers`` gives each layer's gradient weight, one for all rows (a float) or per row (``[B]``; a row whose
    weight is 0 keeps δ = 0 on that layer). ``base``: row offsets set before the phase, which δ adds to (see
    :func:`install_row_offsets`). The model's weights and the layer offsets ``rm.offsets`` get no gradient.

    The steps stay on the device: each installs the current δ unchecked (re-adding ``base``, so every forward sees
    the δ of that step), and no step reads a value back to the host. A step whose loss is not finite is rolled
    back: from there on δ stays at the last value whose loss was finite (device-side, with ``torch.where``), and a
    warning follows the phase. The loss of the final δ is measured by one more forward (no gradient); the result
    is validated once, by installing it through ``rm.set_row_offsets``.
    """
    order = list(layers)
    rows = delta.shape[0]
    weights = torch.stack(
        [torch.as_tensor(layers[i], dtype=delta.dtype).reshape(-1).expand(rows) for i in order], dim=1
    ).to(delta.device)[:, :, None]
    param = delta.detach().clone().requires_grad_()
    optimizer = torch.optim.Adam([param], lr=config.lr)
    last_good = param.detach().clone()
    finite = torch.ones((), dtype=torch.bool, device=delta.device)  # every step's loss so far was finite
    install_row_offsets(rm, order, param, base, checked=False)
    forwards = backwards = 0
    before = None
    first_layer = min(order) if config.reuse_prefix else 0

    def run() -> torch.Tensor:
        return context_loss(rm, input_ids, attention_mask)

    loss_of = compile_step(run, input_ids.device.type, "compile_steps=False") if config.compile_steps else run
    with frozen_weights(rm.model), frozen(rm.offsets.parameters()), PrefixCache(rm, first_layer, run):
        for _ in range(config.steps):
            install_row_offsets(rm, order, param, base, checked=False)
            loss = loss_of()
            forwards += 1
            if before is None:
                before = loss.detach()
            finite = finite & torch.isfinite(loss).all().to(finite.device)
            total = loss.sum() + config.l2 * param.pow(2).sum().to(loss.device)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            backwards += 1
            param.grad.mul_(weights)  # soft selection: per-layer gradient weights (1 for hard/all)
            with torch.no_grad():
                last_good = torch.where(finite, param, last_good)  # δ whose loss was finite
            optimizer.step()
            if config.max_norm is not None:
                with torch.no_grad():
                    norms = param.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                    param.mul_(torch.clamp(config.max_norm / norms, max=1.0))
            with torch.no_grad():
                param.copy_(torch.where(finite, param, last_good))  # after a non-finite loss δ stays put
        with torch.no_grad():
            install_row_offsets(rm, order, param, base, checked=False)
            after = loss_of().cpu()
            forwards += 1
        rolled_back = not bool(finite)
        if not torch.isfinite(after).all():
            rolled_back = True
            with torch.no_grad():
                param.copy_(last_good)
                install_row_offsets(rm, order, param, base, checked=False)
                after = loss_of().cpu()
            forwards += 1
    if rolled_back:
        warnings.warn(
            "rerouting: the context loss became NaN/inf; δ was rolled back to its last finite value", stacklevel=3
        )
    with torch.no_grad():
        delta.copy_(param)
    install_row_offsets(rm, order, delta, base)
    return PhaseResult(delta, before.cpu() if before is not None else after, after, forwards, backwards, rolled_back)
