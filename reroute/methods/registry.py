"""The method registry: a name -> (config dataclass, method class), filled once per method by its own folder.

>>> @register_method("mine", config_cls=MyConfig)          # in reroute/mine/method.py, or in a user's script
... class Mine(RoutingMethod): ...
>>> get_method("mine").method_cls, available_methods()

The evaluation harness, the lm-eval model, save/load and the CLI read this registry and never name a method
(transformers' ``ExpertsInterface`` / peft's ``register_peft_method`` are the models).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_REGISTRY: dict[str, MethodEntry] = {}


@dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Attributes:
        name: the name the harness, lm-eval (``method=``) and the CLI (``--method``) use.
        config_cls: its hyperparameter dataclass (validated in ``__post_init__``).
        method_cls: a :class:`~reroute.methods.RoutingMethod` subclass.
    """

    name: str
    config_cls: type
    method_cls: type

    def option_names(self) -> tuple[str, ...]:
        """Config fields, then the method's extra resources (e.g. C3PO's ``index``)."""
        fields = tuple(f.name for f in dataclasses.fields(self.config_cls))
        return fields + tuple(r for r in self.method_cls.resources if r not in fields)

    def make_config(self, options: dict[str, Any] | None = None) -> Any:
        """The config with ``options`` (config fields only) over its defaults; its own checks raise on bad values."""
        return self.config_cls(**dict(options or {}))

    def split_options(self, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(config fields, resources)``; raises ``ValueError`` naming an option the method does not take."""
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(k for k in options if k not in fields and k not in self.method_cls.resources)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options: {', '.join(self.option_names()) or 'none'}"
            )
        return (
            {k: v for k, v in options.items() if k in fields},
            {k: v for k, v in options.items() if k not in fields},
        )


def register_method(name: str, config_cls: type, method_cls: type | None = None) -> Any:
    """Register a method under ``name``: ``register_method(name, Config, Method)``, or as a class decorator
    ``@register_method(name, config_cls=Config)``. Re-registering a name with other classes is an error (a
    typo would otherwise replace a built-in method silently); registering the same classes again is a no-op."""
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a method name must be a non-empty word (letters, digits, '-', '_'), got {name!r}")
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise TypeError(f"config_cls of method {name!r} must be a dataclass type, got {config_cls!r}")

    def add(cls: type) -> type:
        from reroute.methods.protocol import RoutingMethod

        if not (isinstance(cls, type) and issubclass(cls, RoutingMethod)):
            raise TypeError(f"method_cls of {name!r} must subclass reroute.methods.RoutingMethod, got {cls!r}")
        entry = MethodEntry(name, config_cls, cls)
        known = _REGISTRY.get(name)
        if known is not None and (known.config_cls, known.method_cls) != (config_cls, cls):
            raise ValueError(f"a method named {name!r} is already registered ({known.method_cls.__qualname__})")
        _REGISTRY[name] = entry
        return cls

    return add if method_cls is None else add(method_cls)


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (tests registering a toy method clean up with this)."""
    _REGISTRY.pop(name, None)


BUILTIN_MODULES = (
    "reroute.methods.base",
    "reroute.c3po.method",
    "reroute.rerouting.method",
    "reroute.scmoe.method",
    "reroute.adapters.method",
    "reroute.methods.oracle",
)
"""Where the built-in methods register (in this order); the registry imports them on first use."""


def _builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def get_method(name: str) -> MethodEntry:
    """The entry registered as ``name``; ``ValueError`` listing the known names otherwise."""
    _builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(available_methods())}")
    return _REGISTRY[name]


def _order(item: tuple[int, tuple[str, MethodEntry]]) -> tuple[int, int]:
    position, (_, entry) = item
    module = entry.method_cls.__module__
    builtin = BUILTIN_MODULES.index(module) if module in BUILTIN_MODULES else len(BUILTIN_MODULES)
    return builtin, position


def available_methods(predicate: Callable[[MethodEntry], bool] | None = None) -> tuple[str, ...]:
    """Registered method names: the built-ins in :data:`BUILTIN_MODULES` order (whatever was imported first), then
    the others in registration order; optionally filtered."""
    _builtins()
    ordered = sorted(enumerate(_REGISTRY.items()), key=_order)
    return tuple(n for _, (n, e) in ordered if predicate is None or predicate(e))


def config_types() -> dict[str, type]:
    """Registered config classes by type name: the closed set a saved folder may name (no arbitrary imports)."""
    _builtins()
    return {entry.config_cls.__name__: entry.config_cls for entry in _REGISTRY.values()}
