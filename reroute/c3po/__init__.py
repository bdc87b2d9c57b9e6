"""C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization (arXiv 2504.07964)."""

from reroute.c3po.oracle import OracleResult, optimise_oracle
from reroute.c3po.pathway import Pathway, core_size, critical_layers, own_pathway

__all__ = ["OracleResult", "Pathway", "core_size", "critical_layers", "optimise_oracle", "own_pathway"]
