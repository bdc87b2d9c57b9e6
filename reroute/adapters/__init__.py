"""Amortised routing adapters: router-logit offsets fitted once on a reference set, applied at zero inference cost."""

from reroute.adapters.config import AdapterConfig, AdapterMethodConfig
from reroute.adapters.method import (
    FIT_RECORD,
    Adapter,
    AdapterFit,
    RouterLoraFit,
    fit_adapter,
    fit_router_lora,
    gold_loss,
    load_adapter,
    testbed_adapter,
)

__all__ = [
    "FIT_RECORD",
    "Adapter",
    "AdapterConfig",
    "AdapterFit",
    "AdapterMethodConfig",
    "RouterLoraFit",
    "fit_adapter",
    "fit_router_lora",
    "gold_loss",
    "load_adapter",
    "testbed_adapter",
]
