"""Methods: one registry (name -> config + method class) and the protocol every method implements.

Built-in methods register from their own folders (``reroute/c3po``, ``reroute/rerouting``, ``reroute/scmoe``) and
:mod:`reroute.methods.base` and :mod:`reroute.methods.oracle` (the reference points); ``import reroute`` loads them.
"""

from reroute.methods.protocol import ContinuationScores, RoutingMethod, repeat_rows
from reroute.methods.registry import (
    MethodEntry,
    available_methods,
    config_types,
    get_method,
    register_method,
    unregister_method,
)

__all__ = [
    "ContinuationScores",
    "MethodEntry",
    "RoutingMethod",
    "available_methods",
    "config_types",
    "get_method",
    "register_method",
    "repeat_rows",
    "unregister_method",
]
