"""Reporting evaluation results: a terminal table, a JSON file (one object per run), a PNG bar chart."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from reroute.eval.harness import EvalResult


def print_table(results: Sequence[EvalResult], title: str = "reroute eval") -> None:
    """Accuracy with its 95% interval, items, cost, per method."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("method", "split", "mode", "n", "accuracy", "95% CI", "s/item", "experts/token"):
        table.add_column(column, justify="left" if column in ("method", "split", "mode") else "right")
    for result in results:
        table.add_row(
            result.method,
            result.split,
            result.mode,
            str(result.n),
            f"{100 * result.accuracy:.1f}",
            f"[{100 * result.ci95[0]:.1f}, {100 * result.ci95[1]:.1f}]",
            f"{result.seconds_per_item:.3f}",
            f"{result.experts_per_token:.2f}",
        )
    console = Console()
    if not console.is_terminal:  # pipes and logs: wide enough that no column is cut
        console = Console(width=max(console.width, 110))
    console.print(table)


def write_json(results: Sequence[EvalResult], path: str | Path) -> Path:
    """One JSON object per run: a list of them (``method``, ``split``, ``n``, ``accuracy``, ``ci95``, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [r.to_json() for r in results]
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def plot_bars(results: Sequence[EvalResult], path: str | Path, title: str = "accuracy") -> Path:
    """Bar chart of accuracy with 95% interval error bars, one bar per run, written to ``path`` (a PNG for a
    ``.png`` path). The figure comes from :func:`reroute.plot.accuracy_bars`."""
    from reroute.plot import accuracy_bars

    accuracy_bars(results, title=title, path=path)
    return Path(path)
