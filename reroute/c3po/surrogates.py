"""C3PO's surrogate objectives (paper §3.1–3.3): find a test item's pathway from its successful neighbours.

All functions are batched over B test items. A pathway is the set of mixing logits over each item's core
experts in the critical layers (:class:`~reroute.c3po.pathway.Pathway`); neighbours are given per item as
reference-index ids ``[B, k]`` with kernel weights ``[B, k]`` (rows summing to 1).

* ``mode_finding`` — mean-shift in pathway space (eq. 7–8): no forward passes.
* ``kernel_regression`` — kernel-weighted average of the neighbours' pathways, blended with the item's own;
  the blend weight minimises the neighbours' loss (eq. 4–6): one forward per candidate blend.
* ``neighbourhood_gd`` — NGD: gradient descent on the kernel-weighted loss of the neighbours' gold answers with
  the item's pathway plugged into their forwards (eq. 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from reroute.attach import RoutedModel
from reroute.c3po.config import RECOMPUTE
from reroute.c3po.pathway import Pathway
from reroute.frozen import frozen, frozen_weights
from reroute.prefix import PrefixCache, PrefixStore, SuffixScorer
from reroute.scoring import ContinuationBatch, continuation_logprobs

"""What an optimisation step recomputes: ``suffix`` only the re-mixed position(s) and the continuation through the
critical layers (KV cache of the earlier positions, hidden states entering the first critical layer); ``layers``
every position through the critical layers; ``full`` the whole forward; ``suffix-compiled`` the suffix, each step
compiled (:data:`reroute.prefix.STEP_COMPILE`). All give the same losses up to float rounding; ``suffix`` costs least
in eager mode."""


def kernel_weights(similarity: torch.Tensor, kind: str = "gaussian", bandwidth: float | None = None) -> torch.Tensor:
    """Kernel weights ``[B, k]`` from cosine similarities ``[B, k]`` (rows normalised to sum to 1).

    Distances are ``d = sqrt(2 - 2 s)`` (unit vectors). ``bandwidth`` defaults to each row's median neighbour
    distance, so the kernel adapts to how far the neighbourhood is. Kinds: ``gaussian`` exp(-d²/2h²),
    ``matern`` (ν = 3/2), ``polynomial`` (s + 1)², ``linear`` max(s, 0) (paper Table 6).
    """
    distance = (2.0 - 2.0 * similarity.clamp(-1.0, 1.0)).clamp(min=0.0).sqrt()
    if bandwidth is None:
        h = distance.median(dim=-1, keepdim=True).values.clamp(min=1e-3)
    else:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        h = torch.full_like(distance[:, :1], float(bandwidth))
    # log-weights, normalised with a softmax: as the bandwidth goes to 0 the nearest neighbour takes all the weight
    if kind == "gaussian":
        log_weights = -(distance**2) / (2 * h**2)
    elif kind == "matern":
        scaled = math.sqrt(3.0) * distance / h
        log_weights = torch.log1p(scaled) - scaled
    elif kind == "polynomial":
        log_weights = 2 * torch.log((similarity + 1.0).clamp(min=1e-12))
    elif kind == "linear":
        log_weights = torch.log(similarity.clamp(min=0.0) + 1e-12)
    else:
        raise ValueError(f"unknown kernel {kind!r}: use gaussian, matern, polynomial or linear")
    return torch.softmax(log_weights, dim=-1)


def core_average(
    pathways: torch.Tensor,
    layers_pos: Sequence[int],
    experts: dict[int, torch.Tensor],
    layers: Sequence[int],
    weights: torch.Tensor,
) -> dict[int, torch.Tensor]:
    """Weighted average of reference pathways on each item's core, normalised over the core.

    ``pathways [B, k, L_all, E]`` neighbours' stored routing scores; ``layers_pos`` the positions of the
    critical layers in ``L_all``; ``experts {layer: [B, C]}``; ``weights [B, k]``. Returns ``{layer: [B, C]}``.
    """
    out = {}
    for layer, pos in zip(layers, layers_pos):
        scores = pathways[:, :, pos]  # [B, k, E]
        core = scores.gather(2, experts[layer][:, None, :].expand(-1, scores.shape[1], -1))  # [B, k, C]
        core = core / core.sum(-1, keepdim=True).clamp(min=1e-30)
        out[layer] = (weights[..., None] * core).sum(1)
    return out


def official_pathway(stored: torch.Tensor, similarity: torch.Tensor, layers: Sequence[int]) -> Pathway:
    """The authors' released algorithm (tianyi-lab/C3PO @e4e064a, ``olmoe_optimizer.py``): per critical layer the
    cosine-weighted average of the k neighbours' routing distributions over all experts,
    ``p = sum_i cos_i p_i / sum_i cos_i``, renormalised — kernel regression with alpha = 0, no core restriction.

    ``stored [B, k, Lc, E]`` the neighbours' stored scores in the critical layers; ``similarity [B, k]`` cosine
    similarities. Returns a pathway whose core is every expert (re-mixing then moves the token's whole routing mass
    to ``p`` and the family re-selects its top-k).
    """
    weights = similarity / similarity.sum(-1, keepdim=True)
    experts, logits = {}, {}
    for i, layer in enumerate(layers):
        average = (weights[..., None] * stored[:, :, i]).sum(1)  # [B, E]
        average = average / average.sum(-1, keepdim=True)
        experts[layer] = torch.arange(stored.shape[-1]).expand(len(stored), -1).clone()
        logits[layer] = average.clamp(min=1e-30).log()
    return Pathway(list(layers), experts, logits)


@dataclass
class SurrogateResult:
    """Per item: the chosen pathway, the neighbours' loss before/after, cost counters and, where the surrogate
    computes it, the leave-one-out :func:`holdout_gain` ``[B]``."""

    pathway: Pathway
    loss_before: torch.Tensor
    loss_after: torch.Tensor
    forward_passes: int = 0
    backward_passes: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    holdout_gain: torch.Tensor | None = None


def neighbour_nll(
    rm: RoutedModel,
    pathway: Pathway,
    neighbours: ContinuationBatch,
    k: int,
    positions: torch.Tensor,
    scorer: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """NLL of each neighbour's gold answer ``[B, k]`` with its item's pathway in the neighbour's forward.

    ``neighbours`` has ``B * k`` rows, item-major; the pathway's ``[B, C]`` state expands over them. ``scorer``
    (e.g. a :func:`neighbour_scorer`) computes their continuation log-probabilities ``[B * k]``; by default one full
    forward. Installs the pathway with the unchecked setter (its shapes are the caller's contract).
    """
    pathway.install(rm, positions)
    with rm.row_expansion(k):  # each item's k neighbours: consecutive rows
        logprobs = scorer() if scorer is not None else continuation_logprobs(rm.model, neighbours)
    return -logprobs.view(-1, k)


def neighbour_loss(
    rm: RoutedModel,
    pathway: Pathway,
    neighbours: ContinuationBatch,
    weights: torch.Tensor,
    positions: torch.Tensor,
    scorer: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Kernel-weighted NLL of the neighbours' gold answers ``[B]`` (weights ``[B, k]``) with each item's pathway in
    their forward (see :func:`neighbour_nll`)."""
    nll = neighbour_nll(rm, pathway, neighbours, weights.shape[-1], positions, scorer)
    return (nll * weights.to(nll.device)).sum(-1)


def holdout_gain(table: torch.Tensor, weights: torch.Tensor, base: int) -> torch.Tensor:
    """Leave-one-out check of a choice among candidates ``[B]``: for each neighbour ``j`` the candidate with the
    lowest weighted loss over the *other* neighbours is chosen, and its loss on ``j`` compared with the base
    candidate's; returns the relative fall of the held-out loss, ``sum_j w_j (L[base, j] - L[chosen_j, j]) /
    sum_j w_j L[base, j]`` (0 when every held-out choice is the base; negative when the choices made without ``j``
    hurt ``j``).

    ``table [B, A, k]`` per-neighbour NLL of each candidate; ``weights [B, k]`` kernel weights; ``base`` the index
    of the base candidate (the item's own routing) in ``A``. Needs ``k >= 2`` (with one neighbour: zeros).
    """
    rows, _, k = table.shape
    weights = weights.to(table)
    if k < 2:
        return torch.zeros(rows)
    held = []
    for j in range(k):
        others = weights.clone()
        others[:, j] = 0.0
        chosen = (table * others[:, None, :]).sum(-1).argmin(-1)  # [B]
        held.append(table[torch.arange(rows), chosen, j])
    held_loss = torch.stack(held, dim=-1)  # [B, k]
    base_loss = table[:, base]  # [B, k]
    fall = (weights * (base_loss - held_loss)).sum(-1)
    return (fall / (weights * base_loss).sum(-1).abs().clamp(min=1e-8)).cpu()


@contextmanager
def neighbour_scorer(
    rm: RoutedModel,
    neighbours: ContinuationBatch,
    layers: Sequence[int],
    positions: torch.Tensor,
    recompute: str,
    store: PrefixStore | None = None,
) -> Iterator[Callable[[], torch.Tensor]]:
    """``with neighbour_scorer(...) as score:`` ``score()`` gives ``continuation_logprobs(rm.model, neighbours)``
    ``[B * k]`` under the current routing, recomputing per call only what re-mixing ``layers`` at ``positions``
    (``[R, n]`` absolute, ``-1`` pads) can change (see :data:`RECOMPUTE`). Model weights are frozen inside.
    ``store``: the neighbours' prefix states kept across calls (``suffix`` only)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    valid = positions[positions >= 0]
    start = int(valid.min()) if valid.numel() else neighbours.prompt_len - 1
    first_layer = min(layers)
    with frozen_weights(rm.model), frozen(rm.offsets.parameters()):  # no gradient left on them
        if recompute.startswith("suffix") and 0 < start < neighbours.prompt_len:
            compiled = recompute == "suffix-compiled"
            with SuffixScorer(rm, neighbours, first_layer, start, store, compiled) as score:
                yield score
            return

        def score() -> torch.Tensor:
            return continuation_logprobs(rm.model, neighbours)

        with PrefixCache(rm, first_layer if recompute == "layers" else 0, score):
            yield score


def mode_finding(
    own: Pathway,
    own_scores: torch.Tensor,
    reference: torch.Tensor,
    layers_pos: Sequence[int],
    k: int,
    iterations: int = 5,
    alpha: float = 0.5,
) -> tuple[Pathway, torch.Tensor]:
    """Mean-shift from each item's own pathway toward the local mode of the reference pathways (eq. 7–8).

    ``own_scores [B, L_all, E]`` the items' routing scores; ``reference [N, L_all, E]`` all stored pathways.
    Neighbourhoods and the Gaussian kernel (bandwidth: median neighbour distance) live in pathway space over the
    critical layers. Returns the new pathway and the final point ``[B, Lc * E]``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"mode-finding alpha must be in [0, 1), got {alpha}")
    pos = list(layers_pos)
    points = reference[:, pos].flatten(1)  # [N, Lc*E]
    current = own_scores[:, pos].flatten(1)
    for _ in range(iterations):
        distance = torch.cdist(current, points)  # [B, N]
        near, ids = distance.topk(min(k, len(points)), dim=-1, largest=False)
        h = near.median(dim=-1, keepdim=True).values.clamp(min=1e-6)
        w = torch.exp(-(near**2) / (2 * h**2))
        w = w / w.sum(-1, keepdim=True)
        mean = (w[..., None] * points[ids]).sum(1)
        current = alpha * current + (1 - alpha) * mean
    shaped = current.view(len(current), len(pos), -1)
    logits = {}
    for i, layer in enumerate(own.layers):
        core = shaped[:, i].gather(1, own.experts[layer])
        logits[layer] = (core / core.sum(-1, keepdim=True).clamp(min=1e-30)).clamp(min=1e-30).log()
    return Pathway(list(own.layers), own.experts, logits), current


def kernel_regression(
    rm: RoutedModel,
    own: Pathway,
    target: dict[int, torch.Tensor],
    neighbours: ContinuationBatch,
    weights: torch.Tensor,
    positions: torch.Tensor,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    recompute: str = "suffix",
    store: PrefixStore | None = None,
) -> SurrogateResult:
    """Blend ``alpha * own + (1 - alpha) * kernel average`` (probabilities over the core) with ``alpha`` chosen per
    item among ``alphas`` to minimise the neighbours' loss. ``alpha = 1`` is the base routing. The per-neighbour
    losses also give each item's leave-one-out :func:`holdout_gain` (no extra forward). ``store``: see
    :func:`neighbour_scorer`.

    Every candidate of every item is scored in one forward: the neighbours' rows run once per candidate, side by
    side (``B * len(alphas) * k`` rows), instead of one forward per candidate (the same work on the device, a
    ``len(alphas)``-th of the kernel launches)."""
    alphas = sorted(set(float(a) for a in alphas) | {1.0})
    rows, k = weights.shape
    count = len(alphas)
    own = own.to_layers(rm)
    positions = positions.to(rm.layer(own.layers[0]).device)
    logits = {}
    for layer in own.layers:
        omega = own.omega(layer)  # [B, C]
        alpha = torch.tensor(alphas, device=omega.device)[None, :, None]  # [1, A, 1]
        mix = alpha * omega[:, None] + (1 - alpha) * target[layer].to(omega.device)[:, None]  # [B, A, C]
        logits[layer] = mix.clamp(min=1e-30).log().flatten(0, 1)  # row b * A + a
    experts = {layer: own.experts[layer].repeat_interleave(count, 0) for layer in own.layers}
    candidates = Pathway(list(own.layers), experts, logits)
    # item b's k neighbour rows, once per candidate: row (b * A + a) * k + j
    index = torch.arange(rows * k).view(rows, 1, k).expand(rows, count, k).flatten().to(neighbours.input_ids.device)
    repeated = ContinuationBatch(
        neighbours.input_ids[index],
        neighbours.attention_mask[index],
        neighbours.target_mask[index],
        neighbours.prompt_len,
    )
    expansion = rm.row_expansion(k)  # each candidate's k neighbours: consecutive rows
    scorer = neighbour_scorer(rm, repeated, own.layers, positions, recompute, store)
    with torch.no_grad(), expansion, scorer as score:
        nll = neighbour_nll(rm, candidates, repeated, k, positions, score).float()
    per_neighbour = nll.view(rows, count, k).cpu()  # [B, A, k]; one read-back for every candidate
    table = (per_neighbour * weights.cpu()[:, None, :].float()).sum(-1)  # [B, A]
    best = table.argmin(dim=1)
    chosen = {
        layer: logits[layer].view(rows, count, -1)[torch.arange(rows), best.to(logits[layer].device)].cpu()
        for layer in own.layers
    }
    base_loss = table[:, alphas.index(1.0)]
    return SurrogateResult(
        Pathway(list(own.layers), {layer: v.cpu() for layer, v in own.experts.items()}, chosen),
        base_loss,
        table.gather(1, best[:, None])[:, 0],
        forward_passes=count,
        extra={"alpha": float(torch.tensor([alphas[int(a)] for a in best]).mean())},
        holdout_gain=holdout_gain(per_neighbour, weights.cpu().float(), alphas.index(1.0)),
    )


@torch.enable_grad()  # gradients even where the caller disabled them
def neighbourhood_gd(
    rm: RoutedModel,
    own: Pathway,
    neighbours: ContinuationBatch,
    weights: torch.Tensor,
    positions: torch.Tensor,
    steps: int = 10,
    lr: float = 0.1,
    reuse_prefix: bool = True,
    recompute: str | None = None,
    store: PrefixStore | None = None,
) -> SurrogateResult:
    """NGD: Adam on each item's mixing logits, minimising the kernel-weighted NLL of its neighbours' gold
    answers. Returns the iterate with the lowest neighbour loss per item (the start, i.e. base routing, included).

    ``recompute`` (default ``suffix``; ``full`` when ``reuse_prefix`` is False) says what each step recomputes, see
    :data:`RECOMPUTE`. Pathway, optimiser and loss stay on the critical layers' device; the loop reads nothing back
    to the host. Gradients are taken for the mixing logits only (``torch.autograd.grad``): no ``.grad`` is left on
    the model's weights or the user's offsets. ``store``: see :func:`neighbour_scorer`.
    """
    recompute = recompute or ("suffix" if reuse_prefix else "full")
    own = own.to_layers(rm)
    device = rm.layer(own.layers[0]).device
    positions = positions.to(device)
    weights = weights.to(device)
    params = {layer: own.logits[layer].detach().clone().requires_grad_() for layer in own.layers}
    working = Pathway(list(own.layers), own.experts, params)
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    best = own.detached()
    best_loss = first = None
    forwards = backwards = 0
    expansion = rm.row_expansion(weights.shape[-1])  # each item's k neighbours: consecutive rows
    with expansion, neighbour_scorer(rm, neighbours, own.layers, positions, recompute, store) as score:
        for step in range(steps + 1):
            with torch.set_grad_enabled(step < steps):
                loss = neighbour_loss(rm, working, neighbours, weights, positions, score)
            forwards += 1
            current = loss.detach().float()  # on the device of the model's head
            if first is None:
                first = best_loss = current.clone()
            improved = current < best_loss
            best_loss = torch.where(improved, current, best_loss)
            for layer in own.layers:
                rows = improved.to(params[layer].device)[:, None]
                best.logits[layer] = torch.where(rows, params[layer].detach(), best.logits[layer])
            if step == steps:
                break
            grads = torch.autograd.grad(loss.sum(), list(params.values()))
            for param, grad in zip(params.values(), grads):
                param.grad = grad
            backwards += 1
            optimizer.step()
    return SurrogateResult(
        best.to("cpu"), first.cpu(), best_loss.cpu(), forward_passes=forwards, backward_passes=backwards
    )
