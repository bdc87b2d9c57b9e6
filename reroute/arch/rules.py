"""Routing rules: how a family turns router logits into (weights, indices).

Each rule has two faces:

* ``route`` reproduces the family's own router arithmetic op for op, so that with zero offsets the attached
  model is bit-identical to the original (same dtypes, same reductions, same ``topk(sorted=...)`` calls).
* ``scores`` / ``choice`` / ``finalize`` decompose the same rule into the three steps that routing policies
  and C3PO re-mixing act on: per-expert scores over all experts, the ranking used for selection, and the
  weights of the selected experts. ``finalize(scores, route-selected indices)`` matches ``route`` up to
  rounding; the tests check both faces against the unattached model.

All tensors are token-major: ``logits`` and ``scores`` are ``[tokens, experts]``, indices and weights
``[tokens, k]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _float32_logits(router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """DeepSeek-style router projection: inputs and weight upcast to float32."""
    hidden_states = hidden_states.view(-1, router.hidden_dim)
    return F.linear(hidden_states.type(torch.float32), router.weight.type(torch.float32))


def _group_limit(router: nn.Module, group_scores: torch.Tensor) -> torch.Tensor:
    """Bool ``[T, E]``: experts in each token's ``topk_group`` best groups (group-limited routing)."""
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    group_size = router.num_experts // router.num_group
    return group_mask.unsqueeze(-1).expand(-1, router.num_group, group_size).reshape(-1, router.num_experts).bool()


class RoutingRule:
    """Base class. Subclasses are small dataclasses configured from the family's router module."""

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router projection ``[tokens, hidden] -> [tokens, experts]``, with the family's dtype handling."""
        hidden_states = hidden_states.reshape(-1, router.weight.shape[-1])
        return F.linear(hidden_states, router.weight)

    def route(
        self, router: nn.Module, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's exact rule: ``logits [T, E] -> (weights [T, k], indices [T, k])``.

        ``input_dtype`` is the dtype of the hidden states the router was called with.
        """
        raise NotImplementedError

    def scores(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert routing scores ``[T, E]`` in float32 (the distribution C3PO re-mixes)."""
        return torch.softmax(logits, dim=-1, dtype=torch.float32)

    def choice(self, router: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        """Ranking used for selection ``[T, E]``; experts that may not be chosen are ``-inf``."""
        return scores

    def renormalizes(self, router: nn.Module) -> bool:
        """Whether the selected weights are renormalised to sum to one."""
        return True

    def scaling(self, router: nn.Module) -> float:
        """Constant factor applied to the selected weights (DeepSeek's ``routed_scaling_factor``)."""
        return 1.0

    def finalize(
        self,
        router: nn.Module,
        scores: torch.Tensor,
        indices: torch.Tensor,
        renormalize: bool | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weights ``[T, k]`` of the selected experts: gathered scores, renormalised and scaled as the family does.

        ``keep`` (bool ``[T, k]``) zeroes slots before renormalisation (variable-width selections).
        """
        weights = scores.gather(1, indices)
        if keep is not None:
            weights = weights * keep
        if self.renormalizes(router) if renormalize is None else renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        scale = self.scaling(router)
        return weights * scale if scale != 1.0 else weights


@dataclass(frozen=True)
class SoftmaxTopK(RoutingRule):
    """softmax over all experts -> top-k -> optional renormalisation (OLMoE, Qwen2/3-MoE, Mixtral).

    ``renorm_attr``: router attribute holding the renormalisation flag (``None``: always renormalise, as
    Mixtral does). ``softmax_on_float_logits``: Mixtral calls ``softmax(logits.float())`` where the others
    call ``softmax(logits, dtype=float)``. ``cast_to_logits_dtype``: whether the weights go back to the
    logits' dtype (Mixtral keeps float32).
    """

    renorm_attr: str | None = "norm_topk_prob"
    softmax_on_float_logits: bool = False
    cast_to_logits_dtype: bool = True

    def route(
        self, router: nn.Module, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.softmax_on_float_logits:
            probs = torch.nn.functional.softmax(logits.float(), dim=-1)
        else:
            probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
        if self.renormalizes(router):
            top_value /= top_value.sum(dim=-1, keepdim=True)
        if self.cast_to_logits_dtype:
            top_value = top_value.to(logits.dtype)
        return top_value, top_index

    def renormalizes(self, router: nn.Module) -> bool:
        return True if self.renorm_attr is None else bool(getattr(router, self.renorm_attr))


@dataclass(frozen=True)
class TopKSoftmax(RoutingRule):
    """top-k on the logits -> softmax over the chosen k (GPT-OSS with its router bias, GraniteMoE).

    Mathematically the renormalised softmax over all experts restricted to the top-k, which is how
    ``scores``/``finalize`` express it. ``logits_to_float``: GraniteMoE upcasts the logits to float32 and casts
    the weights back to the hidden states' dtype; GPT-OSS keeps everything in the logits' dtype.
    """

    logits_to_float: bool = False

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.reshape(-1, router.weight.shape[-1])
        logits = F.linear(hidden_states, router.weight, getattr(router, "bias", None))
        return logits.float() if self.logits_to_float else logits

    def route(
        self, router: nn.Module, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        top_logits, top_index = torch.topk(logits, router.top_k, dim=-1)
        if self.logits_to_float:
            return torch.softmax(top_logits, dim=-1).to(input_dtype), top_index
        return torch.nn.functional.softmax(top_logits, dim=1, dtype=top_logits.dtype), top_index


@dataclass(frozen=True)
class DeepseekV2Softmax(RoutingRule):
    """DeepSeek-V2: float32 softmax, greedy or group-limited greedy (group score = max), scaled, no renorm."""

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return _float32_logits(router, hidden_states)

    def route(
        self, router: nn.Module, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if router.topk_method == "group_limited_greedy":
            scores = scores.masked_fill(~self._group_mask(router, scores), 0.0)
        elif router.topk_method != "greedy":
            raise NotImplementedError(f"DeepSeek-V2 topk_method {router.topk_method!r} is not supported")
        weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return weights * router.routed_scaling_factor, indices

    def choice(self, router: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        if router.topk_method != "group_limited_greedy":
            return scores
        return scores.masked_fill(~self._group_mask(router, scores), float("-inf"))

    def renormalizes(self, router: nn.Module) -> bool:
        return False

    def scaling(self, router: nn.Module) -> float:
        return float(router.routed_scaling_factor)

    @staticmethod
    def _group_mask(router: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        group_size = router.num_experts // router.num_group
        return _group_limit(router, scores.view(-1, router.num_group, group_size).max(dim=-1).values)


@dataclass(frozen=True)
class SigmoidGroupLimited(RoutingRule):
    """DeepSeek-V3 / GLM-4-MoE: sigmoid scores, ``e_score_correction_bias`` for the choice only,
    group-limited top-k (group score = sum of its top-2), renormalisation (+1e-20), ``routed_scaling_factor``."""

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return _float32_logits(router, hidden_states)

    def route(
        self, router: nn.Module, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = logits.sigmoid()
        indices = torch.topk(self.choice(router, scores), k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if router.norm_topk_prob:
            denominator = weights.sum(dim=-1, keepdim=True) + 1e-20
            weights /= denominator
        return weights * router.routed_scaling_factor, indices

    def scores(self, router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def choice(self, router: nn.Module, scores: torch.Tensor) -> torch.Tensor:
        group_size = router.num_experts // router.num_group
        for_choice = scores + router.e_score_correction_bias
        group_scores = for_choice.view(-1, router.num_group, group_size).topk(2, dim=-1)[0].sum(dim=-1)
        return for_choice.masked_fill(~_group_limit(router, group_scores), float("-inf"))

    def renormalizes(self, router: nn.Module) -> bool:
        return bool(router.norm_topk_prob)

    def scaling(self, router: nn.Module) -> float:
        return float(router.routed_scaling_factor)


@dataclass(frozen=True)
class SparseMixer(RoutingRule):
    """PhiMoE's SparseMixer top-2 (transformers' own ``sparsemixer`` function, called on the offset logits).

    For policies and re-mixing the rule is expressed as softmax scores renormalised over the selected
    experts, the distribution SparseMixer's weights approximate.
    """

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        if router.training and router.input_jitter_noise > 0:
            hidden_states *= torch.empty_like(hidden_states).uniform_(
                1.0 - router.input_jitter_noise, 1.0 + router.input_jitter_noise
            )
        return F.linear(hidden_states, router.weight, router.bias)

    def route(
        self, router: nn.Module, logits: torch.Tensor, input_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=router.training, top_k=router.top_k)
