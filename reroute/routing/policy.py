"""Routing policies and expert masks, and the generic selection they share.

A policy replaces the family's "top-k" step while keeping its score function, its choice ranking (correction
bias, group limits) and its weight rule (renormalisation, scaling):

* ``RoutingPolicy(top_k=k)`` — a different number of experts.
* ``RoutingPolicy(top_p=p, max_experts=m)`` — dynamic routing ("Harder Tasks Need More Experts", §3): per token,
  the shortest prefix of experts sorted by score whose normalised mass reaches ``p`` (at least one, at most ``m``).
* ``RoutingPolicy(rank=r)`` — only the r-th ranked expert, weight 1 (times the family's scaling factor): SCMoE's
  weak routing for Mixtral is ``rank=2``. ``RoutingPolicy(rank=r, renormalize=False)`` keeps the expert's raw
  routing probability ``p_r`` instead (times the scaling factor), as SCMoE's released DeepSeekMoE code does.
* ``ExpertMask(banned=..., forced=...)`` — experts that may never / must always be selected.

Variable-width selections (top-p) are padded to a fixed width with zero-weight duplicates of the top expert,
which every transformers experts implementation treats as a no-op contribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reroute.arch.rules import RoutingRule

MASK_BANNED, MASK_FORCED = 1, 2
"""Codes of banned and forced experts in the int8 ``[E]`` mask tensors the kernel and the compiled path read."""


@dataclass(frozen=True)
class RoutingPolicy:
    """How many experts each token uses. At most one of ``top_k``, ``top_p`` and ``rank`` may be set.

    Attributes:
        top_k: experts per token (default: the family's own top-k).
        top_p: dynamic routing threshold in (0, 1].
        max_experts: cap on the experts chosen by ``top_p`` (default: all).
        rank: 1-based rank of the single expert to use (weight 1; its raw probability with ``renormalize=False``).
        renormalize: renormalise the selected weights (``None``: as the family does; a single rank-k expert is
            renormalised to 1 unless this is ``False``).
    """

    top_k: int | None = None
    top_p: float | None = None
    max_experts: int | None = None
    rank: int | None = None
    renormalize: bool | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in ("top_k", "top_p", "rank") if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"RoutingPolicy takes at most one of top_k, top_p, rank; got {', '.join(chosen)}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer (1 = the top expert), got {self.rank!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_experts is not None:
            if self.top_p is None:
                raise ValueError("max_experts only applies to top_p routing")
            if not isinstance(self.max_experts, int) or self.max_experts < 1:
                raise ValueError(f"max_experts must be a positive integer, got {self.max_experts!r}")

    def check(self, num_experts: int) -> None:
        """Raise if the policy cannot be applied to a layer with ``num_experts`` experts."""
        for name in ("top_k", "rank", "max_experts"):
            value = getattr(self, name)
            if value is not None and value > num_experts:
                raise ValueError(f"{name}={value} exceeds the layer's {num_experts} experts")

    def width(self, num_experts: int, family_top_k: int) -> int:
        """Number of (expert, weight) slots per token this policy produces."""
        if self.rank is not None:
            return 1
        if self.top_p is not None:
            return min(self.max_experts or num_experts, num_experts)
        return self.top_k or family_top_k

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ExpertMask:
    """Experts that may never (``banned``) or must always (``forced``) be selected, by expert index."""

    banned: tuple[int, ...] = field(default=())
    forced: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "banned", tuple(int(i) for i in self.banned))
        object.__setattr__(self, "forced", tuple(int(i) for i in self.forced))
        overlap = set(self.banned) & set(self.forced)
        if overlap:
            raise ValueError(f"experts {sorted(overlap)} are both banned and forced")

    def check(self, num_experts: int, width: int) -> None:
        """Raise if the mask names unknown experts or leaves too few experts to fill ``width`` slots."""
        for name in ("banned", "forced"):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_experts]
            if bad:
                raise ValueError(f"{name} experts {bad} out of range for a layer with {num_experts} experts")
        allowed = num_experts - len(set(self.banned))
        if allowed == 0:
            raise ValueError("the expert mask bans every expert")
        if allowed < width:
            raise ValueError(f"the expert mask leaves {allowed} experts but routing selects {width} per token")
        if len(set(self.forced)) > width:
            raise ValueError(f"{len(set(self.forced))} forced experts exceed the {width} experts selected per token")

    def to_dict(self) -> dict[str, list[int]]:
        return {"banned": list(self.banned), "forced": list(self.forced)}


def apply_mask(choice: torch.Tensor, mask: ExpertMask | None) -> torch.Tensor:
    """Ban (``-inf``) and force (``+inf``) experts in a choice ranking ``[T, E]``."""
    if mask is None or not (mask.banned or mask.forced):
        return choice
    choice = choice.clone()
    if mask.banned:
        choice[:, list(mask.banned)] = float("-inf")
    if mask.forced:
        choice[:, list(mask.forced)] = float("inf")
    return choice


def select(
    rule: RoutingRule,
    router: torch.nn.Module,
    scores: torch.Tensor,
    policy: RoutingPolicy | None,
    mask: ExpertMask | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic routing from per-expert ``scores [T, E]``: ``(weights [T, w], indices [T, w])`` in float32."""
    policy = policy or RoutingPolicy()
    choice = apply_mask(rule.choice(router, scores), mask)
    num_experts = scores.shape[-1]
    if policy.rank is not None:
        indices = torch.topk(choice, policy.rank, dim=-1).indices[:, -1:]
        if policy.renormalize is False:  # the raw probability p_k (SCMoE's DeepSeekMoE code)
            weights = rule.finalize(router, scores, indices, renormalize=False)
        else:
            weights = torch.ones_like(indices, dtype=torch.float32) * rule.scaling(router)
    elif policy.top_p is not None:
        width = policy.width(num_experts, router.top_k)
        ranked, indices = torch.topk(choice, width, dim=-1)
        mass = scores.gather(1, indices).masked_fill(ranked == float("-inf"), 0.0)
        mass = mass / scores.sum(dim=-1, keepdim=True)
        # keep expert j while the mass before it is still below p: the shortest prefix reaching p, at least one
        keep = (mass.cumsum(dim=-1) - mass) < policy.top_p
        keep[:, 0] = True
        keep &= ranked != float("-inf")
        weights = rule.finalize(router, scores, indices, renormalize=policy.renormalize, keep=keep)
        indices = torch.where(keep, indices, indices[:, :1])
    else:
        indices = torch.topk(choice, policy.top_k or router.top_k, dim=-1).indices
        # fewer selectable experts than slots: a slot filled from a -inf choice is no expert; the weights are
        # renormalised over the experts actually kept, and the slot carries a zero-weight copy of the first one
        kept = choice.gather(1, indices) != float("-inf")
        weights = rule.finalize(router, scores, indices, renormalize=policy.renormalize, keep=kept)
        indices = torch.where(kept, indices, indices[:, :1])
    # A slot filled from -inf choices (too few selectable experts) must not contribute.
    blocked = choice.gather(1, indices) == float("-inf")
    return weights.masked_fill(blocked, 0.0), indices
