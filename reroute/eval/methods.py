"""Evaluation methods by name: :func:`make_method` names a registered method and its options; the harness builds
it on the model (:mod:`reroute.methods` holds the registry and the protocol every method implements)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reroute.attach import RoutedModel
from reroute.methods import RoutingMethod, available_methods, get_method


@dataclass
class MethodSpec:
    """A registered method with its config and resources, not yet bound to a model.

    Attributes:
        name: the registered name.
        config: the method's config dataclass.
        resources: its other options (e.g. C3PO's ``index``).
    """

    name: str
    config: Any
    resources: dict[str, Any] = field(default_factory=dict)

    def build(self, rm: RoutedModel, tokenizer: Any) -> RoutingMethod:
        """The method on ``rm`` (e.g. a C3PO index folder is loaded now)."""
        method = get_method(self.name).method_cls.from_config(rm, tokenizer, self.config, **self.resources)
        method.name = self.name
        return method


def make_method(name: str, options: Mapping[str, Any] | None = None, **kwargs: Any) -> MethodSpec:
    """A registered method by name with its options: config fields and resources, given as keyword arguments
    and/or as an ``options`` dict (e.g. ``make_method("c3po", index="idx", options={"surrogate": "kernel"})``)."""
    entry = get_method(name)
    config_options, resources = entry.split_options({**dict(options or {}), **kwargs})
    config = entry.make_config(config_options)
    entry.method_cls.check_options(config, resources)
    return MethodSpec(name, config, resources)


_DEPRECATED = {"Base": "base", "Oracle": "oracle", "C3POMethod": "c3po", "ReroutingMethod": "rerouting",
               "SCMoEMethod": "scmoe"}  # fmt: skip
"""The per-method evaluation classes this module held before the registry: ``make_method(name, ...)`` now."""


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # the registered names (a live view: a method registered later shows up too)
        return available_methods()
    if name in _DEPRECATED:
        method = _DEPRECATED[name]

        def deprecated(options: Mapping[str, Any] | None = None, **kwargs: Any) -> MethodSpec:
            warnings.warn(
                f"reroute.eval.methods.{name} is deprecated; use make_method({method!r}, ...)",
                DeprecationWarning,
                stacklevel=2,
            )
            kwargs.pop("name", None)
            return make_method(method, options, **kwargs)

        return deprecated
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
