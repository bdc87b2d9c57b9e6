"""Hyperparameters of an amortised routing adapter (:func:`reroute.adapters.fit_adapter`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields


@dataclass
class AdapterConfig:
    """How per-layer router-logit offsets are fitted on a reference set's gold answers.

    The offsets are the model's ordinary ``rm.offsets`` (one ``[E]`` vector per MoE layer, shared by every token
    and item), so the fitted adapter costs nothing at inference: the same forward, and under ``torch.compile``
    the same graph, as zero state.
    """

    steps: int = field(default=60, metadata={"help": "Adam steps (one mini-batch of reference items per step)"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate on the offsets"})
    batch_size: int = field(default=32, metadata={"help": "reference items per step"})
    layers: str | Sequence[int] = field(
        default="all", metadata={"help": "'all' MoE layers or a list of decoder-layer indices to fit"}
    )
    l2: float = field(default=0.0, metadata={"help": "L2 penalty on the offsets added to the mean loss"})
    max_norm: float | None = field(
        default=None, metadata={"help": "after each step, clip each layer's offsets to this L2 norm (None: no clip)"}
    )
    prompt_field: str = field(
        default="prompt",
        metadata={"help": "item field holding the prompt the gold answer follows ('prompt', or e.g. 'question')"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the mini-batch order"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seed"):
            value = getattr(self, name)
            low = 0 if name == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        if not isinstance(self.l2, (int, float)) or not math.isfinite(self.l2) or self.l2 < 0:
            raise ValueError(f"l2 must be a non-negative number, got {self.l2!r}")
        if self.max_norm is not None and not (isinstance(self.max_norm, (int, float)) and self.max_norm > 0):
            raise ValueError(f"max_norm must be positive or None, got {self.max_norm!r}")
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(f"layers must be 'all' or a list of MoE layer indices, got {self.layers!r}")
        elif not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise ValueError(f"layers must be 'all' or a non-empty list of integer layer indices, got {self.layers!r}")
        if not isinstance(self.prompt_field, str) or not self.prompt_field:
            raise ValueError(f"prompt_field must be a non-empty field name, got {self.prompt_field!r}")


@dataclass
class AdapterMethodConfig:
    """The ``adapter`` evaluation method: a fitted adapter's offsets added to the routing while another registered
    method (``inner``, default ``base``) adapts, scores and generates on top of them.

    ``fit`` (:class:`AdapterConfig` fields) and ``reference_size`` are used only when no saved adapter is given and
    one is fitted on the testbed's reference set (cached per setting and model).
    """

    inner: str = field(default="base", metadata={"help": "registered method run on top of the adapter ('c3po', ...)"})
    inner_options: dict = field(
        default_factory=dict, metadata={"help": "the inner method's config fields and resources, e.g. {'steps': 5}"}
    )
    fit: dict = field(
        default_factory=dict,
        metadata={
            "help": "AdapterConfig fields for fitting one on the testbed when none is given, e.g. {'steps': 150}"
        },
    )
    reference_size: int = field(
        default=800, metadata={"help": "testbed reference items the adapter is fitted on when none is given"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.inner, str) or not self.inner or self.inner == "adapter":
            raise ValueError(f"inner must be another registered method's name, got {self.inner!r}")
        if not isinstance(self.inner_options, dict):
            raise ValueError(f"inner_options must be a dict of the inner method's options, got {self.inner_options!r}")
        if not isinstance(self.fit, dict):
            raise ValueError(f"fit must be a dict of AdapterConfig fields, got {self.fit!r}")
        unknown = sorted(set(self.fit) - {f.name for f in fields(AdapterConfig)})
        if unknown:
            raise ValueError(f"fit has no field {', '.join(map(repr, unknown))}; AdapterConfig's fields: "
                             f"{', '.join(f.name for f in fields(AdapterConfig))}")  # fmt: skip
        self.fit_config()  # its own checks
        if not isinstance(self.reference_size, int) or isinstance(self.reference_size, bool) or self.reference_size < 1:
            raise ValueError(f"reference_size must be a positive integer, got {self.reference_size!r}")

    def fit_config(self) -> AdapterConfig:
        """The fitting hyperparameters."""
        return AdapterConfig(**self.fit)
