"""Architecture adapters: one registry entry per transformers MoE family.

An entry names the family's router class (``*TopKRouter`` in transformers 5.x) and its routing rule
(``reroute/arch/rules.py``). Everything else — where the MoE layers are, which layers are dense, how many
experts — is read off the loaded model, so an entry stays a few lines. ``families.py`` holds the built-in
entries; users add their own with :func:`register_family`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from reroute.arch.rules import RoutingRule


@dataclass(frozen=True)
class FamilyAdapter:
    """How to route one transformers MoE family.

    Attributes:
        model_type: ``config.model_type`` of the family (the registry key).
        display_name: name shown to users ("Mixtral").
        router_class: dotted path of the family's router module class.
        rule: the family's routing rule.
    """

    model_type: str
    display_name: str
    router_class: str
    rule: RoutingRule

    def resolve_router_class(self) -> type[nn.Module]:
        """Import the router class; a clear error if this transformers version lacks it."""
        module_name, _, class_name = self.router_class.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"{self.display_name}: router class {self.router_class} is not in the installed transformers; "
                "reroute needs transformers>=5 with fused MoE experts"
            ) from exc


class UnsupportedModelError(ValueError):
    """The model is not a transformers MoE family that reroute knows how to route."""


_REGISTRY: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter, *, overwrite: bool = False) -> None:
    """Add a family to the registry (``overwrite=True`` replaces an existing entry)."""
    if adapter.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"family {adapter.model_type!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[adapter.model_type] = adapter


def supported_families() -> dict[str, str]:
    """``{model_type: display name}`` of every registered family."""
    return {key: adapter.display_name for key, adapter in sorted(_REGISTRY.items())}


def family_for(model_type: str) -> FamilyAdapter:
    """The adapter for ``model_type``, or an error naming the supported families and how to add one."""
    if model_type not in _REGISTRY:
        names = ", ".join(f"{name} ({key})" for key, name in supported_families().items())
        raise UnsupportedModelError(
            f"reroute does not know how to route model_type {model_type!r}. Supported families: {names}. "
            "To add one, register its router class and routing rule: "
            "reroute.register_family(reroute.FamilyAdapter(model_type=..., display_name=..., "
            "router_class='transformers.models.<family>.modeling_<family>.<Router>', rule=reroute.rules.SoftmaxTopK()))"
        )
    return _REGISTRY[model_type]


from reroute.arch import families as _families  # noqa: E402,F401  (registers the built-in families)
