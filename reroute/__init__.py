"""reroute: test-time adaptation of the expert routing of transformers Mixture-of-Experts models."""

from reroute import plot
from reroute.arch import FamilyAdapter, UnsupportedModelError, register_family, rules, supported_families
from reroute.attach import OffsetTable, RoutedModel, attach
from reroute.c3po import C3PO, C3POConfig, ReferenceIndex
from reroute.pretrained import RerouteConfig, from_pretrained
from reroute.rerouting import Rerouter, RerouterConfig, rerouting_generate
from reroute.routing import ExpertMask, RoutingPolicy, Trace
from reroute.scmoe import SCMoE, SCMoEConfig, scmoe_generate
from reroute.self_consistency import Vote, majority_vote, self_consistency, text_sampler

__version__ = "0.1.0"

__all__ = [
    "C3PO",
    "C3POConfig",
    "ReferenceIndex",
    "ExpertMask",
    "FamilyAdapter",
    "OffsetTable",
    "RoutedModel",
    "RoutingPolicy",
    "Trace",
    "UnsupportedModelError",
    "attach",
    "register_family",
    "rules",
    "supported_families",
    "Rerouter",
    "RerouterConfig",
    "rerouting_generate",
    "SCMoE",
    "SCMoEConfig",
    "scmoe_generate",
    "Vote",
    "majority_vote",
    "self_consistency",
    "text_sampler",
    "RerouteConfig",
    "from_pretrained",
    "plot",
]
