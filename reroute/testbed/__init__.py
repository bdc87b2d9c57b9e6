"""The trained testbed: a small OLMoE trained on a synthetic multi-domain suite where routing errors cost accuracy.

``load_testbed()`` gives the shipped model and tokenizer; ``make_split`` / ``load_split`` the task items;
``score_choices`` / ``exact_match`` score them. ``NOTES.md`` beside this file has the design and measured numbers.
"""

from reroute.testbed.model import checkpoint_path, load_testbed, testbed_config
from reroute.testbed.scoring import ChoiceScores, exact_match, generate_greedy, score_choices
from reroute.testbed.suite import DOMAINS, SPLITS, Domain, load_items, load_split, make_split, write_jsonl
from reroute.testbed.tokenizer import build_tokenizer

__all__ = [
    "DOMAINS",
    "SPLITS",
    "ChoiceScores",
    "Domain",
    "build_tokenizer",
    "checkpoint_path",
    "exact_match",
    "generate_greedy",
    "load_items",
    "load_split",
    "load_testbed",
    "make_split",
    "score_choices",
    "testbed_config",
    "write_jsonl",
]
