"""Evaluation harness: methods, ``run_eval`` with bootstrap intervals, and reports (table, JSON, PNG)."""

from reroute.eval.harness import EvalResult, bootstrap_ci, paired_difference, run_eval
from reroute.eval.methods import MethodSpec, make_method
from reroute.eval.report import plot_bars, print_table, write_json

__all__ = [
    "MethodSpec",
    "EvalResult",
    "bootstrap_ci",
    "make_method",
    "paired_difference",
    "plot_bars",
    "print_table",
    "run_eval",
    "write_json",
]


def __getattr__(name: str) -> object:
    if name == "METHODS":  # the registered method names
        from reroute.methods import available_methods

        return available_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
