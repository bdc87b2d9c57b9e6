"""``SCMoEConfig``: the hyperparameters of self-contrast decoding (SCMoE, arXiv 2405.14507), validated on creation."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from reroute.routing.policy import RoutingPolicy

DESIGNS = ("one-batch", "two-pass")
_WEAK_NAME = re.compile(r"(?P<kind>rank|top|random)-?(?P<k>\d+)")


def parse_weak(weak: str | RoutingPolicy) -> tuple[RoutingPolicy, bool]:
    """The weak routing's policy, and whether its single expert is drawn at random.

    * ``"rank<k>"`` (or ``"rank-<k>"``): only the k-th ranked expert, weight 1 — paper Eq. 4; ``"rank2"`` is its
      Mixtral setting (§3.2).
    * ``"top<k>"``: the top-k experts weighted by the family's own rule — renormalised on Mixtral (the authors'
      Mixtral code renormalises the weak top-k' weights), raw on DeepSeekMoE-style ``norm_topk_prob=False``
      layers, the paper's DeepSeekMoE setting (App. C; shared experts stay on since they are outside the router).
      ``RoutingPolicy(top_k=k, renormalize=False)`` forces raw weights.
    * ``"random1"``: one expert drawn uniformly per token, weight 1 (§4.1 "random-1").
    * a :class:`RoutingPolicy`, used as given.
    """
    if isinstance(weak, RoutingPolicy):
        return weak, False
    if not isinstance(weak, str):
        raise TypeError(f"weak must be a string such as 'rank2' or a RoutingPolicy, got {type(weak).__name__}")
    match = _WEAK_NAME.fullmatch(weak.strip().lower())
    if match is None:
        raise ValueError(f"weak routing {weak!r} not understood; use 'rank<k>', 'top<k>', 'random1' or a RoutingPolicy")
    kind, k = match["kind"], int(match["k"])
    if k < 1:
        raise ValueError(f"weak routing {weak!r}: k must be at least 1")
    if kind == "rank":
        return RoutingPolicy(rank=k), False
    if kind == "top":
        return RoutingPolicy(top_k=k), False
    if k != 1:
        raise ValueError(f"weak routing {weak!r}: only random1 (one random expert per token) is defined")
    return RoutingPolicy(rank=1), True


@dataclass
class SCMoEConfig:
    """SCMoE hyperparameters; defaults are the paper's main setting (Mixtral, §3.2, App. D).

    Next-token logits: ``(1 + beta) * z_strong - beta * z_weak`` on the plausible tokens
    ``z_strong >= log(alpha) + max z_strong`` and ``-inf`` elsewhere (§2.3, Eq. 5-6).
    """

    beta: float = field(
        default=0.5, metadata={"help": "contrast strength β >= 0 (paper searches 0.1-0.9; 0.5 best overall)"}
    )
    alpha: float = field(
        default=0.1, metadata={"help": "plausibility cut-off α in (0, 1]: keep tokens with p >= α max p (paper: 0.1)"}
    )
    weak: str | RoutingPolicy = field(
        default="rank2",
        metadata={"help": "weak routing: 'rank<k>', 'top<k>', 'random1', a RoutingPolicy (or its to_dict())"},
    )
    layers: Sequence[int] | None = field(
        default=None,
        metadata={"help": "decoder-layer indices of the MoE layers routed weakly (None: all, as the paper)"},
    )
    design: str = field(
        default="one-batch",
        metadata={
            "help": "'one-batch': strong and weak rows in one forward of 2B rows; 'two-pass': two forwards with "
            "two KV caches, as the official code"
        },
    )
    seed: int | None = field(
        default=None, metadata={"help": "seed of random1's expert draws (None: drawn from torch's global RNG)"}
    )
    allow_eos: bool = field(
        default=True,
        metadata={
            "help": "False: EOS gets -inf in the contrast, as the authors' code without --early_stop (generation "
            "then runs to max_new_tokens)"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)):
            raise TypeError(f"beta must be a number, got {type(self.beta).__name__}")
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be finite and >= 0, got {self.beta}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"alpha must be a number, got {type(self.alpha).__name__}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if isinstance(self.weak, dict):  # a policy as written by to_dict()
            self.weak = RoutingPolicy(**self.weak)
        parse_weak(self.weak)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise TypeError(f"layers must be a sequence of layer indices, got {self.layers!r}")
            if len(self.layers) == 0:
                raise ValueError("layers is empty; pass None to route every MoE layer weakly")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers repeats an index: {list(self.layers)}")
            self.layers = tuple(self.layers)
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {self.design!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.allow_eos, bool):
            raise TypeError(f"allow_eos must be True or False, got {self.allow_eos!r}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (a policy as its dict); ``SCMoEConfig(**config.to_dict())`` is the same config."""
        weak = self.weak.to_dict() if isinstance(self.weak, RoutingPolicy) else self.weak
        return {
            "beta": self.beta,
            "alpha": self.alpha,
            "weak": weak,
            "layers": None if self.layers is None else list(self.layers),
            "design": self.design,
            "seed": self.seed,
            "allow_eos": self.allow_eos,
        }
