"""C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization (arXiv 2504.07964).

Where things are: ``index.py`` (reference index), ``embed.py`` (embedders), ``pathway.py`` (critical layers,
core experts), ``surrogates.py`` (mode finding, kernel regression, NGD), ``oracle.py`` (upper bound),
``config.py`` (``C3POConfig``), ``method.py`` (``C3PO``).
"""

from reroute.c3po.config import C3POConfig
from reroute.c3po.embed import CallableEmbedder, HiddenStateEmbedder, PathwayEmbedder, make_embedder
from reroute.c3po.index import Neighbours, ReferenceIndex, ReferenceIndexError
from reroute.c3po.method import C3PO, Adaptation
from reroute.c3po.oracle import optimise_oracle
from reroute.c3po.pathway import Pathway, core_size, critical_layers, own_pathway
from reroute.c3po.surrogates import SurrogateResult

__all__ = [
    "C3PO",
    "Adaptation",
    "C3POConfig",
    "CallableEmbedder",
    "HiddenStateEmbedder",
    "Neighbours",
    "Pathway",
    "PathwayEmbedder",
    "ReferenceIndex",
    "ReferenceIndexError",
    "SurrogateResult",
    "core_size",
    "critical_layers",
    "make_embedder",
    "optimise_oracle",
    "own_pathway",
]
