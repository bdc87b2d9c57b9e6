"""Amortised routing adapters: router-logit offsets fitted once on a reference set, applied at zero inference cost."""

from reroute.adapters.config import AdapterConfig
from reroute.adapters.method import FIT_RECORD, AdapterFit, fit_adapter, gold_loss

__all__ = ["FIT_RECORD", "AdapterConfig", "AdapterFit", "fit_adapter", "gold_loss"]
