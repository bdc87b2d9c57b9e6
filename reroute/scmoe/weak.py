"""SCMoE's weak activation of an attached model: which policy, on which layers, and how it is switched on.

The strong routing is the model's routing as the :class:`~reroute.RoutedModel` currently has it (offsets,
masks, per-row offsets and re-mixing; layer policies too with the two-pass design, since the one-batch design
needs the weak layers' policy slot). The weak routing replaces the policy of the chosen MoE layers — for every row
of a forward (two-pass design) or only for the weak rows of a doubled batch (one-batch design) — and is switched
off again after each forward, restoring exactly what was set before. Everything else set on the model applies to
the weak pass as well: it is the same model, more weakly activated.

random-1 (paper §4.1, one uniformly drawn expert per token with weight 1) is built from public routing state:
``RoutingPolicy(rank=1)`` on the weak rows plus router-logit offsets, drawn afresh for every token of every forward
(prompt tokens included, as the authors' code draws per token), of ``+RANDOM_OFFSET`` on the drawn expert and
``-RANDOM_OFFSET`` on the others. The routing scores are then exactly one-hot in float32 (softmax and sigmoid
alike), so the drawn expert is the first choice unless the family's choice ranking outranks a score of 1 (a large
score-correction bias) or a mask forbids it; :class:`RandomExperts` checks this per layer and draws only among the
experts the layer's mask allows. The per-token offsets are added to the router logits by a wrapper of the layer's
routing rule (:class:`DrawnOffsets`), installed for one forward: the recorded trace shows them, and such a layer
routes on the PyTorch path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from reroute.arch.rules import RoutingRule
from reroute.attach import RoutedModel
from reroute.routing.layer import LayerRouting
from reroute.routing.policy import RoutingPolicy, apply_mask, check_routing
from reroute.scmoe.config import parse_weak

RANDOM_OFFSET = 1.0e4
"""Size of random-1's router-logit offsets (router logits are O(10); exp(-1e4) underflows to 0, 1e4 fits bf16)."""


def _same_as_strong(policy: RoutingPolicy, layer: LayerRouting) -> bool:
    """Whether ``policy`` selects and weighs exactly as the layer's own routing (a zero contrast)."""
    renormalizes = layer.rule.renormalizes(layer.router)
    same_norm = policy.renormalize is None or policy.renormalize == renormalizes
    if policy.top_p is not None:
        return False
    if policy.rank is not None:
        # rank-1 gives weight 1 (times the scaling), which top-1 also gives when the family renormalises
        return policy.rank == 1 and layer.top_k == 1 and renormalizes
    return (policy.top_k is None or policy.top_k == layer.top_k) and same_norm


@dataclass(frozen=True)
class WeakRouting:
    """The weak routing of SCMoE on one attached model.

    Attributes:
        policy: applied to the weak rows of ``layers`` (``RoutingPolicy(rank=1)`` for random-1).
        layers: decoder-layer indices of the weakly routed MoE layers.
        random: random-1: the rank-1 expert is a uniformly drawn one (see the module docstring).
    """

    policy: RoutingPolicy
    layers: tuple[int, ...]
    random: bool = False

    @classmethod
    def resolve(cls, rm: RoutedModel, weak: str | RoutingPolicy, layers: Sequence[int] | None = None) -> WeakRouting:
        """Check ``weak`` against the model's layers. Errors: a rank or top-k beyond a layer's experts, a weak
        top-k above the strong top-k, random-1 on a layer whose choice offsets cannot control. A warning when the
        weak routing equals the strong one (the contrast is then zero: decoding on the plausible set only).

        A rank above the strong top-k is allowed: that expert is one the strong routing never uses, which is the
        paper's point (Table 8 sweeps rank 1-8 on top-2 Mixtral; rank-3 is best on GSM8K).
        """
        policy, random = parse_weak(weak)
        selected = rm.moe_layers if layers is None else [rm.layer(int(i)).layer_idx for i in layers]
        for idx in selected:
            layer = rm.layer(idx)
            for name in ("rank", "top_k", "max_experts"):
                value = getattr(policy, name)
                if value is not None and value > layer.num_experts:
                    raise ValueError(
                        f"weak routing {name}={value} needs at least {value} experts, but MoE layer {idx} has "
                        f"{layer.num_experts}"
                    )
            if policy.top_k is not None and policy.top_k > layer.top_k:
                raise ValueError(
                    f"weak routing top-{policy.top_k} uses more experts than the strong routing (top-{layer.top_k}) "
                    f"of MoE layer {idx}; SCMoE contrasts the model with a weaker activation of itself"
                )
            check_routing(layer.rule, layer.router, layer.num_experts, layer.top_k, policy, layer.mask)
        if random:
            for idx in selected:
                _forceable_experts(rm.layer(idx))
        elif all(_same_as_strong(policy, rm.layer(idx)) for idx in selected):
            warnings.warn(
                f"SCMoE: the weak routing {policy} equals the model's own routing on every weak layer, so the "
                "contrast is zero (decoding reduces to the plausible-token set of the strong logits)",
                UserWarning,
                stacklevel=3,
            )
        return cls(policy=policy, layers=tuple(selected), random=random)

    @contextlib.contextmanager
    def applied(
        self, rm: RoutedModel, num_rows: int, rows: torch.Tensor | None = None, draws: RandomExperts | None = None
    ) -> Iterator[None]:
        """Inside the block, the next forward of ``num_rows`` rows routes weakly on ``self.layers`` — every row, or
        only where the bool mask ``rows [num_rows]`` is set. The layers' policies, per-row offsets and rules are
        restored on exit. random-1 needs ``draws``.
        """
        selected = [rm.layer(idx) for idx in self.layers]
        saved = [(layer.policy, layer.policy_rows, layer.row_offsets) for layer in selected]
        if rows is not None and any(policy is not None for policy, _, _ in saved):
            raise ValueError(
                "SCMoE's one-batch design routes the weak rows through the layer policy, but a policy is already "
                "set on a weak layer; use design='two-pass' to keep it for the strong pass"
            )
        if self.random and draws is None:
            raise ValueError("random-1 weak routing needs its RandomExperts draws")
        try:
            rm.set_policy(self.policy, layers=list(self.layers), rows=rows)
            if self.random:
                for layer in selected:
                    layer.rule = DrawnOffsets(layer, draws, rows)
            yield
        finally:
            for layer, (policy, policy_rows, row_offsets) in zip(selected, saved):
                layer.policy, layer.policy_rows, layer.row_offsets = policy, policy_rows, row_offsets
                if isinstance(layer.rule, DrawnOffsets):
                    layer.rule = layer.rule.base


class RandomExperts:
    """random-1's experts for one decoding call: per weak layer the experts that may be drawn, and the generator.

    Args:
        rm: the attached model.
        layers: the weak layers.
        seed: seeds a CPU generator (the draws do not depend on the device); ``None`` draws the seed from torch's
            global generator, so ``torch.manual_seed`` makes runs reproducible.

    Raises ``ValueError`` for a layer where offsets cannot make some allowed expert the first choice.
    """

    def __init__(self, rm: RoutedModel, layers: Sequence[int], seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(seed)
        self.candidates = {idx: _forceable_experts(rm.layer(idx)) for idx in layers}

    def draw(self, layer_idx: int, count: int, seq: int) -> torch.Tensor:
        """Experts ``[count, seq]`` (long, CPU) drawn uniformly among the layer's candidates, one per token."""
        candidates = self.candidates[layer_idx]
        return candidates[torch.randint(len(candidates), (count, seq), generator=self.generator)]


class DrawnOffsets(RoutingRule):
    """A layer's routing rule with random-1's per-token offsets added to its router logits.

    On every call (one per forward of the layer) each weak row's tokens get ``+RANDOM_OFFSET`` on a freshly drawn
    expert and ``-RANDOM_OFFSET`` on the others; other rows' logits are left exactly as they are. Draws go layer by
    layer in forward order, weak rows in order, tokens in order, so both designs draw the same experts.

    Args:
        layer: the weak layer (for the batch layout of the current forward).
        draws: the call's :class:`RandomExperts`.
        rows: bool ``[B]`` weak rows of the forward (``None``: every row).
    """

    def __init__(self, layer: LayerRouting, draws: RandomExperts, rows: torch.Tensor | None) -> None:
        self.base, self.layer, self.draws = layer.rule, layer, draws
        self.rows = None if rows is None else rows.cpu()

    def logits(self, router: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.base.logits(router, hidden_states)
        batch, seq = self.layer.batch_shape(logits.shape[0])
        weak_rows = torch.ones(batch, dtype=torch.bool) if self.rows is None else self.rows
        drawn = self.draws.draw(self.layer.layer_idx, int(weak_rows.sum()), seq)
        offsets = torch.zeros(batch, seq, logits.shape[-1])
        offsets[weak_rows] = (2.0 * torch.nn.functional.one_hot(drawn, logits.shape[-1]).float() - 1.0) * RANDOM_OFFSET
        return logits + offsets.view(batch * seq, -1).to(device=logits.device, dtype=logits.dtype)

    def route(
        self, router: torch.nn.Module, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.route(router, logits, input_dtype)

    def scores(self, router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return self.base.scores(router, logits)

    def choice(self, router: torch.nn.Module, scores: torch.Tensor) -> torch.Tensor:
        return self.base.choice(router, scores)

    def renormalizes(self, router: torch.nn.Module) -> bool:
        return self.base.renormalizes(router)

    def scaling(self, router: torch.nn.Module) -> float:
        return self.base.scaling(router)

    def finalize(
        self,
        router: torch.nn.Module,
        scores: torch.Tensor,
        indices: torch.Tensor,
        renormalize: bool | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.base.finalize(router, scores, indices, renormalize=renormalize, keep=keep)


def _forceable_experts(layer: LayerRouting) -> torch.Tensor:
    """Experts random-1 may draw on ``layer``: those its mask allows, each of which must then be the strict first
    choice when the scores are one-hot on it (what the offsets produce)."""
    num_experts = layer.num_experts
    one_hot = torch.eye(num_experts, device=layer.device)
    choice = apply_mask(layer.rule.choice(layer.router, one_hot), layer.mask)
    others = choice.masked_fill(one_hot.bool(), float("-inf")).max(dim=-1).values
    first = choice.diagonal() > others
    banned = set(layer.mask.banned) if layer.mask is not None else set()
    allowed = [e for e in range(num_experts) if e not in banned]
    failing = [e for e in allowed if not bool(first[e])]
    if failing:
        raise ValueError(
            f"random1 cannot make experts {failing} the first choice of MoE layer {layer.layer_idx}: its selection "
            "ranks other experts above a routing score of 1 (a score-correction bias or an expert mask that forces "
            "experts); use a rank or top-k weak routing"
        )
    return torch.tensor(allowed)
