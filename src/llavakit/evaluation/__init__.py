"""llavakit.evaluation: benchmarks scored as lmms-eval scores them, and the runner that evaluates checkpoints.

``score(benchmark_id, rows)`` recomputes a benchmark's metrics from rows of its data carrying ``prediction``.
"""

from llavakit.evaluation.registry import benchmarks, get_benchmark, score

__all__ = ["benchmarks", "get_benchmark", "score"]
