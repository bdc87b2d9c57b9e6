"""The routing kernel's view of a family's rule, in plain Python (no triton import): which rules the Triton routing
kernel (``kernels/routing.py``, ``reroute.kernels.routing``) can express, and the fields it reads off a router.

Rules the kernel cannot express (PhiMoE's SparseMixer, user-registered rules, more than :data:`MAX_EXPERTS`
experts) have no :class:`RoutingSpec`: :func:`spec_for` returns ``None`` and the caller keeps the PyTorch path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from reroute.arch.rules import DeepseekV2Softmax, RoutingRule, SigmoidGroupLimited, SoftmaxTopK, TopKSoftmax

MAX_EXPERTS = 256
"""Largest expert count one program holds in registers."""


@dataclass(frozen=True)
class RoutingSpec:
    """A family's routing rule in the kernel's terms, read off one router module.

    Attributes:
        top_k: the family's experts per token.
        score: ``"softmax"`` or ``"sigmoid"``.
        exact: how ``rule.route`` weighs the chosen experts: ``"scores"`` (gathered scores) or ``"logits_softmax"``
            (top-k on the logits, softmax over the chosen k: GPT-OSS, GraniteMoE).
        group: group-limited choice: ``None``, ``"max"`` (DeepSeek-V2) or ``"top2"`` (DeepSeek-V3, GLM-4-MoE).
        num_group, topk_group: expert groups and how many of them each token may use.
        zero_fill: ``rule.route`` fills experts outside the chosen groups with 0 rather than ``-inf`` (DeepSeek-V2).
        renormalize: whether the selected weights are renormalised.
        route_eps: what ``rule.route`` adds to the renormalisation denominator (the generic path adds 1e-20).
        scaling: ``routed_scaling_factor`` (1 where the family has none).
        correction_bias: ``e_score_correction_bias [E]`` added to the scores for the choice only, or ``None``.
        weights_dtype: dtype of ``rule.route``'s weights: ``"logits"``, ``"input"`` (the hidden states') or
            ``"float32"``.
    """

    top_k: int
    score: str = "softmax"
    exact: str = "scores"
    group: str | None = None
    num_group: int = 1
    topk_group: int = 1
    zero_fill: bool = False
    renormalize: bool = True
    route_eps: float = 0.0
    scaling: float = 1.0
    correction_bias: torch.Tensor | None = None
    weights_dtype: str = "logits"

    def __post_init__(self) -> None:
        choices = {
            "score": ("softmax", "sigmoid"),
            "exact": ("scores", "logits_softmax"),
            "group": (None, "max", "top2"),
            "weights_dtype": ("logits", "input", "float32"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RoutingSpec.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.group is not None and not 1 <= self.topk_group <= self.num_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, num_group={self.num_group}]")

    def output_dtype(self, logits_dtype: torch.dtype, input_dtype: torch.dtype) -> torch.dtype:
        return {"logits": logits_dtype, "input": input_dtype, "float32": torch.float32}[self.weights_dtype]


class KernelMixing(NamedTuple):
    """C3PO re-mixing resolved for one call: core ``experts`` long ``[R, C]``, their mixture ``omega`` float
    ``[R, C]`` (rows sum to one), and ``tokens`` bool ``[T]`` (the tokens at re-mixing positions)."""

    experts: torch.Tensor
    omega: torch.Tensor
    tokens: torch.Tensor


def _softmax_top_k(rule: SoftmaxTopK, router: nn.Module) -> RoutingSpec:
    return RoutingSpec(
        top_k=int(router.top_k),
        renormalize=rule.renormalizes(router),
        weights_dtype="logits" if rule.cast_to_logits_dtype else "float32",
    )


def _top_k_softmax(rule: TopKSoftmax, router: nn.Module) -> RoutingSpec:
    return RoutingSpec(
        top_k=int(router.top_k),
        exact="logits_softmax",
        weights_dtype="input" if rule.logits_to_float else "logits",
    )


def _deepseek_v2(rule: DeepseekV2Softmax, router: nn.Module) -> RoutingSpec | None:
    if router.topk_method == "greedy":
        group = None
    elif router.topk_method == "group_limited_greedy":
        group = "max"
    else:
        return None  # the PyTorch path raises its clear error
    return RoutingSpec(
        top_k=int(router.top_k),
        group=group,
        num_group=int(router.num_group),
        topk_group=int(router.topk_group),
        zero_fill=True,
        renormalize=False,
        scaling=float(router.routed_scaling_factor),
        weights_dtype="float32",
    )


def _sigmoid_group_limited(rule: SigmoidGroupLimited, router: nn.Module) -> RoutingSpec:
    return RoutingSpec(
        top_k=int(router.top_k),
        score="sigmoid",
        group="top2",
        num_group=int(router.num_group),
        topk_group=int(router.topk_group),
        renormalize=bool(router.norm_topk_prob),
        route_eps=1e-20,
        scaling=float(router.routed_scaling_factor),
        correction_bias=router.e_score_correction_bias,
        weights_dtype="float32",
    )


_SPECS: dict[type, Callable[[RoutingRule, nn.Module], RoutingSpec | None]] = {
    SoftmaxTopK: _softmax_top_k,
    TopKSoftmax: _top_k_softmax,
    DeepseekV2Softmax: _deepseek_v2,
    SigmoidGroupLimited: _sigmoid_group_limited,
}


def spec_for(rule: RoutingRule, router: nn.Module) -> RoutingSpec | None:
    """The kernel's view of ``rule`` on ``router``, or ``None`` where only the PyTorch path can route it.

    Looked up by the rule's exact class, so a user's subclass (which may change the arithmetic) falls back.
    """
    build = _SPECS.get(type(rule))
    if build is None:
        return None
    num_experts = int(router.num_experts)
    if num_experts > MAX_EXPERTS:
        return None
    spec = build(rule, router)
    if spec is not None and spec.group is not None and num_experts % spec.num_group:
        return None
    return spec
