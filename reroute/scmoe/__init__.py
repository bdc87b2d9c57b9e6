"""SCMoE self-contrast decoding (arXiv 2405.14507).

Where things are: ``config.py`` (``SCMoEConfig``, weak-routing names), ``weak.py`` (the weak routing on an
attached model, random-1), ``decoding.py`` (the contrast, both designs, ``SCMoE`` and ``scmoe_generate``).
"""

from reroute.scmoe.config import SCMoEConfig, parse_weak
from reroute.scmoe.decoding import SCMoE, scmoe_generate, self_contrast
from reroute.scmoe.weak import RANDOM_OFFSET, RandomExperts, WeakRouting

__all__ = [
    "RANDOM_OFFSET",
    "RandomExperts",
    "SCMoE",
    "SCMoEConfig",
    "WeakRouting",
    "parse_weak",
    "scmoe_generate",
    "self_contrast",
]
