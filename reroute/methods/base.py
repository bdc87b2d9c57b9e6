"""The model's own routing (``base``), the reference point every evaluation compares against."""

from __future__ import annotations

from dataclasses import dataclass

from reroute.attach import RoutedModel
from reroute.methods.protocol import RoutingMethod
from reroute.methods.registry import register_method


@dataclass
class BaseConfig:
    """The model's own routing has no hyperparameters."""


@register_method("base", config_cls=BaseConfig)
class BaseRouting(RoutingMethod):
    """The model's own routing (with whatever routing state ``rm`` holds)."""

    plain_routing = True

    def __init__(self, rm: RoutedModel, config: BaseConfig | None = None) -> None:
        self.rm, self.config = rm, config or BaseConfig()
