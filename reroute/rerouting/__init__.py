"""Continuous rerouting (arXiv 2510.14853): router-logit offsets learned online from the context."""

from reroute.rerouting.adapt import (
    PhaseResult,
    adapt_phase,
    context_loss,
    routing_confidence,
    select_layers,
)
from reroute.rerouting.config import RerouterConfig
from reroute.rerouting.method import Rerouter, rerouting_generate

__all__ = [
    "PhaseResult",
    "Rerouter",
    "rerouting_generate",
    "RerouterConfig",
    "adapt_phase",
    "context_loss",
    "routing_confidence",
    "select_layers",
]
