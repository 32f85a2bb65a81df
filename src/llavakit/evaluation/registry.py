"""Benchmarks by id (lmms-eval's task names), and `score`: metrics from rows that carry predictions.

Each benchmark module exposes ``BENCHMARKS``, a tuple of `Benchmark` values; this registry collects them. Modules
are imported on first use so ``llavakit --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from llavakit.errors import DataError
from llavakit.evaluation.benchmark import Benchmark
from llavakit.registry import Registry

# One module per benchmark family, under llavakit.evaluation.
BENCHMARK_MODULES = (
    "mme",
    "mmbench",
    "pope",
    "scienceqa",
    "seedbench",
    "ai2d",
    "mmmu",
    "textvqa",
    "gqa",
    "vqav2",
    "vizwiz",
    "chartqa",
    "docvqa",
    "llava_wild",
    "mmvet",
    "ocrbench",
    "realworldqa",
    "mmstar",
    "heldout",
)

_REGISTRY: Registry[Benchmark] | None = None


def benchmarks() -> Registry[Benchmark]:
    """The registry of every shipped benchmark, built on first call."""
    global _REGISTRY
    if _REGISTRY is None:
        registry: Registry[Benchmark] = Registry("benchmark")
        for module in BENCHMARK_MODULES:
            for benchmark in importlib.import_module(f"llavakit.evaluation.{module}").BENCHMARKS:
                registry.register(benchmark.id, benchmark)
        _REGISTRY = registry
    return _REGISTRY


def get_benchmark(benchmark: str | Benchmark) -> Benchmark:
    """The benchmark with id ``benchmark`` (a `Benchmark` is returned as it is); unknown ids list the valid ones."""
    return benchmark if isinstance(benchmark, Benchmark) else benchmarks().get(benchmark)


def score(benchmark: str | Benchmark, rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics of ``benchmark`` over ``rows``.

    Args:
        benchmark: a benchmark id (``mme``, ``pope``, ``mmbench_en_dev``, ...) or value.
        rows: dicts of the data source's own columns (the lmms-lab dataset's names) plus ``prediction``: the raw
            model output, or None for no output (scored as an empty answer, as lmms-eval scores a failed call).

    Returns:
        lmms-eval's metric keys on lmms-eval's scales, plus ``"<group>/<name>"`` breakdowns.
    """
    bench = get_benchmark(benchmark)
    results: dict[str, list[Any]] = defaultdict(list)
    count = 0
    for number, row in enumerate(rows):
        if "prediction" not in row:
            raise DataError(f"{bench.id}: row {number} has no 'prediction' key (use None for no output)")
        prediction = row["prediction"]
        if prediction is not None and not isinstance(prediction, str):
            raise DataError(
                f"{bench.id}: row {number} prediction must be a string or None, got {prediction!r}"
            )
        for key, value in bench.process_results(row, prediction or "").items():
            results[key].append(value)
        count += 1
    if count == 0:
        raise DataError(f"{bench.id}: no rows to score")
    return bench.aggregate(results)
