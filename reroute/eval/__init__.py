"""Evaluation harness: methods, ``run_eval`` with bootstrap intervals, and reports (table, JSON, PNG)."""

from reroute.eval.harness import EvalResult, bootstrap_ci, run_eval
from reroute.eval.methods import METHODS, make_method
from reroute.eval.report import plot_bars, print_table, write_json

__all__ = [
    "METHODS",
    "EvalResult",
    "bootstrap_ci",
    "make_method",
    "plot_bars",
    "print_table",
    "run_eval",
    "write_json",
]
