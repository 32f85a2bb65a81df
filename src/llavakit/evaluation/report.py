"""Printed tables of benchmark metrics: the headline metrics, then one table per breakdown group.

Metrics keyed ``"<group>/<name>"`` (``"category/existence"``, ``"acc_plus/OCR"``) are gathered into one table per
group, names as rows; plain keys are the headline (lmms-eval's metric names).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from rich.console import Console
from rich.table import Table


def metric_tables(benchmark_id: str, metrics: Mapping[str, float]) -> list[Table]:
    """The headline table, then one table per breakdown group (in first-seen order)."""
    headline = Table(title=benchmark_id, title_justify="left")
    headline.add_column("metric")
    headline.add_column("value", justify="right")
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in metrics.items():
        group, slash, name = key.partition("/")
        if slash:
            groups[group][name] = value
        else:
            headline.add_row(key, _number(value))
    tables = [headline]
    if groups:
        names = list(dict.fromkeys(name for values in groups.values() for name in values))
        breakdown = Table(title=f"{benchmark_id} by {' / '.join(groups)}", title_justify="left")
        breakdown.add_column("")
        for group in groups:
            breakdown.add_column(group, justify="right")
        for name in names:
            breakdown.add_row(name, *(_number(groups[g][name]) if name in groups[g] else "" for g in groups))
        tables.append(breakdown)
    return tables


def print_metrics(
    benchmark_id: str,
    metrics: Mapping[str, float],
    failed: Mapping[str, str] | None = None,
    console: Console | None = None,
) -> None:
    """Print the tables, then the questions that failed (their ids and errors, the first ten)."""
    console = console or Console()
    for table in metric_tables(benchmark_id, metrics):
        console.print(table)
    if failed:
        console.print(f"[bold]{len(failed)} question(s) failed[/bold] (scored as no answer):")
        for key, error in list(failed.items())[:10]:
            console.print(f"  {key}: {error}", markup=False)


def _number(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
