"""SCMoE self-contrast decoding (arXiv 2405.14507).

Where things are: ``config.py`` (``SCMoEConfig``, weak-routing names), ``weak.py`` (the weak routing on an
attached model, random-1), ``method.py`` (the contrast, both designs, ``SCMoE`` and ``scmoe_generate``; it was
``decoding.py``, which still imports as an alias of ``method``).
"""

import sys

from reroute.scmoe import method as decoding  # noqa: F401  (the module's old name, for attribute access)
from reroute.scmoe.config import SCMoEConfig, parse_weak
from reroute.scmoe.method import SCMoE, scmoe_generate, self_contrast
from reroute.scmoe.weak import RANDOM_OFFSET, RandomExperts, WeakRouting

sys.modules.setdefault(f"{__name__}.decoding", decoding)  # the module's old name keeps importing (import form)

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
