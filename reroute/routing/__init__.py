"""Routing control: per-layer state (offsets, policies, masks, C3PO re-mixing), the trace recorder, route replay."""

from reroute.routing.layer import LayerRouting, Mixing, RoutingContext
from reroute.routing.policy import ExpertMask, RoutingPolicy
from reroute.routing.replay import Routes
from reroute.routing.trace import RoutingRecord, Trace

__all__ = [
    "ExpertMask",
    "LayerRouting",
    "Mixing",
    "RoutingContext",
    "RoutingPolicy",
    "RoutingRecord",
    "Routes",
    "Trace",
]
