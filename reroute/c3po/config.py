"""``C3POConfig``: C3PO's hyperparameters (arXiv 2504.07964), a dataclass validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

SURROGATES = ("ngd", "kernel", "mode", "oracle", "official")
KERNELS = ("gaussian", "matern", "polynomial", "linear")
RECOMPUTE = ("suffix", "layers", "full", "suffix-compiled")
"""What each surrogate step recomputes (see :func:`reroute.c3po.surrogates.neighbour_scorer`); ``suffix-compiled`` is
``suffix`` with each step compiled (:data:`reroute.prefix.STEP_COMPILE`)."""


@dataclass
class C3POConfig:
    """C3PO hyperparameters; defaults are the paper's OLMoE settings where it states them."""

    surrogate: str = field(
        default="ngd",
        metadata={
            "help": "ngd | kernel | mode | oracle (reads labels) | official (the authors' released code: cosine-"
            "weighted average of the k neighbours' routing over all experts, at the last token of every forward)"
        },
    )
    k: int = field(default=3, metadata={"help": "neighbours per test item (paper Table 4: k=3 best)"})
    kernel: str = field(default="gaussian", metadata={"help": "gaussian | matern | polynomial | linear"})
    bandwidth: float | None = field(default=None, metadata={"help": "kernel bandwidth; None = median distance"})
    critical_layers: int | float | list[int] = field(
        default=5, metadata={"help": "last n MoE layers, a fraction of them, or explicit layer indices"}
    )
    core_experts: int | float = field(default=20, metadata={"help": "top-n experts per item, or a fraction of E"})
    last_tokens: int = field(default=1, metadata={"help": "re-mix the last n prompt tokens (paper: 1)"})
    steps: int = field(default=10, metadata={"help": "optimisation steps (NGD, oracle)"})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate on the mixing logits"})
    exclude_above: float = field(default=0.95, metadata={"help": "drop neighbours more similar than this"})
    mode_iterations: int = field(default=5, metadata={"help": "mean-shift iterations"})
    mode_alpha: float = field(default=0.5, metadata={"help": "mean-shift step: x <- a x + (1 - a) mean"})
    kernel_alphas: tuple[float, ...] = field(
        default=(0.0, 0.25, 0.5, 0.75), metadata={"help": "blend weights tried by kernel regression (1 = own)"}
    )
    min_agreement: float | None = field(
        default=None, metadata={"help": "gate: keep base routing when neighbours' pathway similarity is lower"}
    )
    min_gain: float | None = field(
        default=0.0, metadata={"help": "gate: keep base routing when the neighbours' loss falls by less (relative)"}
    )
    min_holdout_gain: float | None = field(
        default=None,
        metadata={
            "help": "gate (kernel): keep base routing unless the leave-one-out check over the neighbours (choose the "
            "blend on k-1, score the held-out one) lowers their loss by more than this (relative; None: off)"
        },
    )
    max_typicality: float | None = field(
        default=0.9,
        metadata={
            "help": "gate: keep base routing when the item's own pathway (critical layers) has cosine similarity at "
            "least this to a successful reference item's (its routing is already typical; None: off; not applied to "
            "the oracle or 'official')"
        },
    )
    max_confidence: float | None = field(
        default=0.99,
        metadata={
            "help": "gate: keep base routing when the model's next-token probability at the last prompt token is "
            "at least this (do not re-mix what the model is already sure of; None: off; not applied to the oracle)"
        },
    )
    reuse_prefix: bool = field(
        default=True, metadata={"help": "reuse what a step cannot change (False: recompute='full')"}
    )
    recompute: str = field(
        default="suffix",
        metadata={
            "help": "what each surrogate step recomputes: suffix (the re-mixed token(s) and the answer through the "
            "critical layers), layers (every position through the critical layers), full, or suffix-compiled "
            "(suffix, each step compiled with torch.compile and replayed as a CUDA graph on CUDA: the first call at "
            "a new batch shape compiles or records); same results up to float rounding"
        },
    )

    prefix_cache_mib: float = field(
        default=1024.0,
        metadata={
            "help": "neighbours' prefix states (KV cache before the re-mixed token in the critical layers, hidden "
            "states entering them) kept across calls, in MiB on the model's device, least recently used dropped "
            "first; emptied when the weights or the routing state change (recompute='suffix'; 0: off). About "
            "2 * critical_layers * kv_heads * head_dim * prompt_tokens * dtype bytes per neighbour: 10 MiB for "
            "OLMoE-1B-7B in bf16 with 256-token prompts"
        },
    )

    def __post_init__(self) -> None:
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {self.surrogate!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        for name in ("k", "last_tokens", "mode_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        if self.max_typicality is not None and not (
            isinstance(self.max_typicality, (int, float)) and -1.0 <= self.max_typicality <= 1.0
        ):
            raise ValueError(
                f"max_typicality must be a cosine similarity in [-1, 1] or None, got {self.max_typicality}"
            )
        if self.max_confidence is not None and not 0.0 < self.max_confidence <= 1.0:
            raise ValueError(f"max_confidence must be in (0, 1] or None, got {self.max_confidence}")
        if isinstance(self.prefix_cache_mib, bool) or not (
            isinstance(self.prefix_cache_mib, (int, float)) and 0 <= self.prefix_cache_mib < float("inf")
        ):
            raise ValueError(f"prefix_cache_mib must be a non-negative number of MiB, got {self.prefix_cache_mib!r}")
        if not 0.0 < self.exclude_above <= 1.0:
            raise ValueError(f"exclude_above must be in (0, 1], got {self.exclude_above}")
