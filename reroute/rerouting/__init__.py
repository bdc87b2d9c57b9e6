"""Continuous rerouting (arXiv 2510.14853): router-logit offsets learned online from the context."""

from reroute.rerouting.adapt import (
    PhaseResult,
    RerouterConfig,
    adapt_phase,
    context_loss,
    routing_confidence,
    select_layers,
)

__all__ = ["PhaseResult", "RerouterConfig", "adapt_phase", "context_loss", "routing_confidence", "select_layers"]
