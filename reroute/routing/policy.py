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

import numbers
import operator
from dataclasses import dataclass, field

import torch

from reroute.arch.rules import DeepseekV2Softmax, RoutingRule, SigmoidGroupLimited

MASK_BANNED, MASK_FORCED = 1, 2
"""Codes of banned and forced experts in the int8 ``[E]`` mask tensors the kernel and the compiled path read."""


def _is_bool(value: object) -> bool:
    """Python, numpy and torch booleans (``True`` is an ``int`` in Python, but never a count or an index here)."""
    return (
        isinstance(value, bool)
        or type(value).__name__ == "bool_"
        or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    )


def as_integer(value: object, what: str) -> int:
    """``value`` as an ``int`` if it is integer-like (``int``, numpy / 0-d torch integers); else a ``TypeError``."""
    if _is_bool(value) or isinstance(value, (str, bytes, float)):
        raise TypeError(f"{what} must be an integer, got {value!r}; pass an int")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}; pass an int") from None


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
        # integer-like numbers (numpy, 0-d tensors) become ints; bools, floats and strings are refused
        for name in ("top_k", "rank", "max_experts"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_integer(value, f"RoutingPolicy {name}"))
        if self.top_p is not None:
            if _is_bool(self.top_p) or not isinstance(self.top_p, numbers.Real):
                raise TypeError(f"RoutingPolicy top_p must be a number in (0, 1], got {self.top_p!r}")
            object.__setattr__(self, "top_p", float(self.top_p))
        if self.renormalize is not None:
            if not _is_bool(self.renormalize) or isinstance(self.renormalize, torch.Tensor):
                raise TypeError(f"RoutingPolicy renormalize must be True, False or None, got {self.renormalize!r}")
            object.__setattr__(self, "renormalize", bool(self.renormalize))
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be a positive integer (1 = the top expert), got {self.rank!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_experts is not None:
            if self.top_p is None:
                raise ValueError("max_experts only applies to top_p routing")
            if self.max_experts < 1:
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

    def needed(self, num_experts: int, family_top_k: int) -> int:
        """Experts a token must be able to choose from: the rank for rank-k, 1 for top-p (it stops at the
        selectable ones), the slot count for top-k."""
        if self.rank is not None:
            return self.rank
        if self.top_p is not None:
            return 1
        return self.width(num_experts, family_top_k)

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ExpertMask:
    """Experts that may never (``banned``) or must always (``forced``) be selected, by expert index."""

    banned: tuple[int, ...] = field(default=())
    forced: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("banned", "forced"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TypeError(f"ExpertMask {name} must be a sequence of expert indices, got {value!r}")
            object.__setattr__(self, name, tuple(as_integer(i, f"ExpertMask {name} expert") for i in value))
        overlap = set(self.banned) & set(self.forced)
        if overlap:
            raise ValueError(f"experts {sorted(overlap)} are both banned and forced")

    def check(self, num_experts: int, width: int, needed: int | None = None) -> None:
        """Raise if the mask names unknown experts, forces more than ``width`` slots hold, or leaves fewer than
        ``needed`` (default ``width``) experts to choose from."""
        for name in ("banned", "forced"):
            bad = [i for i in getattr(self, name) if not 0 <= i < num_experts]
            if bad:
                raise ValueError(f"{name} experts {bad} out of range for a layer with {num_experts} experts")
        allowed = num_experts - len(set(self.banned))
        needed = width if needed is None else needed
        if allowed == 0:
            raise ValueError("the expert mask bans every expert")
        if allowed < needed:
            raise ValueError(f"the expert mask leaves {allowed} experts but routing selects {needed} per token")
        if len(set(self.forced)) > width:
            raise ValueError(f"{len(set(self.forced))} forced experts exceed the {width} experts selected per token")

    def to_dict(self) -> dict[str, list[int]]:
        return {"banned": list(self.banned), "forced": list(self.forced)}


def group_limit(rule: RoutingRule, router: torch.nn.Module) -> tuple[int, int] | None:
    """``(num_group, topk_group)`` where the family's ranking keeps only each token's best groups (DeepSeek-V3,
    GLM-4-MoE, DeepSeek-V2's group-limited greedy), else ``None``."""
    if isinstance(rule, SigmoidGroupLimited) or (
        isinstance(rule, DeepseekV2Softmax) and router.topk_method == "group_limited_greedy"
    ):
        return int(router.num_group), int(router.topk_group)
    return None


def fewest_selectable(num_experts: int, groups: tuple[int, int] | None, mask: ExpertMask | None) -> int:
    """The fewest experts any token can choose from: those of its ``topk_group`` groups (all experts without a
    group limit) that the mask does not ban, plus forced experts outside them. The worst case takes the groups
    with the fewest such experts, since the groups are chosen from scores the mask does not see."""
    banned = set(mask.banned) if mask is not None else set()
    forced = set(mask.forced) if mask is not None else set()
    if groups is None:
        return num_experts - len(banned)
    num_group, topk_group = groups
    size = num_experts // num_group
    gain = sorted(
        sum(e not in banned and e not in forced for e in range(g * size, (g + 1) * size)) for g in range(num_group)
    )
    return len(forced) + sum(gain[:topk_group])


def check_routing(
    rule: RoutingRule,
    router: torch.nn.Module,
    num_experts: int,
    top_k: int,
    policy: RoutingPolicy | None,
    mask: ExpertMask | None,
) -> None:
    """Raise ``ValueError`` unless every token can be routed under ``policy`` and ``mask`` on this layer.

    The rule: rank-r needs r experts every token can choose from (the family's group limit and the mask
    included); top-p needs one; top-k needs its k, except that where the family's own group limit leaves fewer
    than k, the token routes to those, renormalised over them (:func:`select`) — a mask may not cut below that.
    """
    if policy is not None:
        policy.check(num_experts)
    width = policy.width(num_experts, top_k) if policy is not None else top_k
    needed = policy.needed(num_experts, top_k) if policy is not None else top_k
    groups = group_limit(rule, router)
    if mask is not None:
        mask.check(num_experts, width, needed=min(needed, fewest_selectable(num_experts, groups, None)))
    available = fewest_selectable(num_experts, groups, mask)
    if policy is not None and policy.rank is not None and policy.rank > available:
        where = " within the group limit" if groups is not None else ""
        masked = " and the expert mask" if mask is not None else ""
        raise ValueError(
            f"rank={policy.rank} needs {policy.rank} experts to rank but some tokens can choose from only "
            f"{available}{where}{masked}; pass rank <= {available}"
        )
    if mask is not None and groups is not None:
        unmasked = fewest_selectable(num_experts, groups, None)
        if available < min(needed, unmasked):
            raise ValueError(
                f"the expert mask leaves some tokens only {available} experts within the group limit "
                f"({groups[1]} of {groups[0]} groups) but routing selects {min(needed, unmasked)}; ban fewer experts "
                "inside one group"
            )


def mask_codes(mask: ExpertMask | None, num_experts: int) -> torch.Tensor:
    """int8 ``[E]`` on the CPU: 0 free, :data:`MASK_BANNED`, :data:`MASK_FORCED` (what the routing kernel and the
    compiled path read instead of the mask's Python tuples)."""
    codes = torch.zeros(num_experts, dtype=torch.int8)
    if mask is not None:
        codes[list(mask.banned)] = MASK_BANNED
        codes[list(mask.forced)] = MASK_FORCED
    return codes


def pad_slots(weights: torch.Tensor, indices: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``[T, w]`` to ``width`` slots with zero-weight copies of the first expert (a no-op for every experts
    backend)."""
    extra = width - weights.shape[1]
    if extra == 0:
        return weights, indices
    pad_i = indices[:, :1].expand(-1, extra)
    return torch.cat([weights, weights.new_zeros(weights.shape[0], extra)], 1), torch.cat([indices, pad_i], 1)


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
