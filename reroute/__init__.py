"""reroute: test-time adaptation of the expert routing of transformers Mixture-of-Experts models.

Public names load on first use (PEP 562), so ``import reroute.attach`` loads the routing layers alone and
``import reroute`` stays cheap; ``from reroute import C3PO`` and ``reroute.C3PO`` work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names that are also submodule names load now: importing a submodule binds its name on the package, which would
# otherwise hide the function of the same name (reroute.attach, reroute.self_consistency). Both import no method.
from reroute.attach import OffsetTable, RoutedModel, attach, from_pretrained  # noqa: E402
from reroute.self_consistency import Vote, majority_vote, self_consistency, text_sampler  # noqa: E402

# public name -> the module defining it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "C3PO": "reroute.c3po",
    "C3POConfig": "reroute.c3po",
    "ReferenceIndex": "reroute.c3po",
    "ExpertMask": "reroute.routing",
    "RoutingPolicy": "reroute.routing",
    "Trace": "reroute.routing",
    "FamilyAdapter": "reroute.arch",
    "UnsupportedModelError": "reroute.arch",
    "register_family": "reroute.arch",
    "rules": "reroute.arch",
    "supported_families": "reroute.arch",
    "RerouteConfig": "reroute.pretrained",
    "Rerouter": "reroute.rerouting",
    "RerouterConfig": "reroute.rerouting",
    "rerouting_generate": "reroute.rerouting",
    "SCMoE": "reroute.scmoe",
    "SCMoEConfig": "reroute.scmoe",
    "scmoe_generate": "reroute.scmoe",
    "RoutingMethod": "reroute.methods",
    "available_methods": "reroute.methods",
    "get_method": "reroute.methods",
    "register_method": "reroute.methods",
}
_SUBMODULES = ("plot",)

__all__ = [
    "OffsetTable",
    "RoutedModel",
    "attach",
    "from_pretrained",
    "Vote",
    "majority_vote",
    "self_consistency",
    "text_sampler",
    "C3PO",
    "C3POConfig",
    "ReferenceIndex",
    "ExpertMask",
    "RoutingPolicy",
    "Trace",
    "FamilyAdapter",
    "UnsupportedModelError",
    "register_family",
    "rules",
    "supported_families",
    "RerouteConfig",
    "Rerouter",
    "RerouterConfig",
    "rerouting_generate",
    "SCMoE",
    "SCMoEConfig",
    "scmoe_generate",
    "RoutingMethod",
    "available_methods",
    "get_method",
    "register_method",
    "plot",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"reroute.{name}")
    else:
        raise AttributeError(f"module 'reroute' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from reroute import plot
    from reroute.arch import FamilyAdapter, UnsupportedModelError, register_family, rules, supported_families
    from reroute.c3po import C3PO, C3POConfig, ReferenceIndex
    from reroute.methods import RoutingMethod, available_methods, get_method, register_method
    from reroute.pretrained import RerouteConfig
    from reroute.rerouting import Rerouter, RerouterConfig, rerouting_generate
    from reroute.routing import ExpertMask, RoutingPolicy, Trace
    from reroute.scmoe import SCMoE, SCMoEConfig, scmoe_generate
