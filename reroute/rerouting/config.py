"""``RerouterConfig``: continuous rerouting's hyperparameters (arXiv 2510.14853), validated on construction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RerouterConfig:
    """Continuous-rerouting hyperparameters (paper: lr 0.05, 5 steps, every 128 tokens)."""

    interval: int = field(default=128, metadata={"help": "generated tokens between adaptation phases"})
    steps: int = field(default=5, metadata={"help": "optimisation steps per phase (0 = plain decoding)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate on δ"})
    layers: str | Sequence[int] = field(
        default="confidence",
        metadata={"help": "'confidence' (select by C_i), 'all' or a list of MoE layer indices"},
    )
    selection: str = field(default="hard", metadata={"help": "'hard' top-r fraction of layers or 'soft' weighting"})
    ratio: float = field(default=0.5, metadata={"help": "hard selection: fraction of MoE layers adapted"})
    prefer: str = field(
        default="confident",
        metadata={
            "help": "which end of C_i = -mean log p(selected experts) to adapt: 'confident' (low C_i, what the "
            "paper's text says; the default, by measurement on the testbed) or 'uncertain' (high C_i, what its "
            "formula selects)"
        },
    )
    max_norm: float | None = field(default=None, metadata={"help": "clip each row's δ to this L2 norm per layer"})
    l2: float = field(default=0.0, metadata={"help": "L2 penalty on δ added to the loss"})
    rebuild_cache: bool = field(
        default=True, metadata={"help": "re-prefill the KV cache under the new routing (False: keep the stale cache)"}
    )
    reuse_prefix: bool = field(default=True, metadata={"help": "run the layers below the first adapted layer once"})
    compile_steps: bool = field(
        default=False,
        metadata={
            "help": "compile each adaptation step's forward and backward as one graph (a CUDA graph on CUDA; an "
            "eager step launches every layer's small kernels from Python, which bounds it by the host at small "
            "batches); the first phases of each context length compile"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {self.interval!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        if isinstance(self.layers, str) and self.layers not in ("all", "confidence"):
            raise ValueError(f"layers must be 'all', 'confidence' or a list of MoE layer indices, got {self.layers!r}")
        if self.selection not in ("hard", "soft"):
            raise ValueError(f"selection must be 'hard' or 'soft', got {self.selection!r}")
        if self.prefer not in ("uncertain", "confident"):
            raise ValueError(f"prefer must be 'uncertain' or 'confident', got {self.prefer!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {self.max_norm}")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"l2 must be a non-negative number, got {self.l2}")
