"""The explicit skip policy for bad samples: raise at once, or skip, count and report.

Upstream LLaVA either crashes on the first bad file or silently retries another index; neither tells the user how
much data was lost. Every data-layer check reports to an `IssueLog`: with ``policy="error"`` the first issue is raised
as is; with ``policy="skip"`` it is counted by kind (with a few example messages kept for the report) and the caller
moves on. `IssueLog.check_fraction` then fails loudly when more than ``max_fraction`` of the samples were skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llavakit.errors import ConfigError, DataError, LlavakitError

POLICIES = ("error", "skip")
EXAMPLES_PER_KIND = 5


@dataclass
class IssueLog:
    """Counts skipped samples by kind.

    Attributes:
        policy: ``error`` (raise the first issue) | ``skip`` (count it and continue).
        max_fraction: with ``skip``, the largest tolerated fraction of skipped samples (see `check_fraction`).
        counts: number of issues per kind (e.g. ``missing_image``, ``json``, ``too_long``).
        max_examples: messages kept per kind, for the report.
        examples: up to ``max_examples`` messages per kind.
    """

    policy: str = "error"
    max_fraction: float = 0.01
    max_examples: int = EXAMPLES_PER_KIND
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"skip_policy {self.policy!r} must be one of {', '.join(POLICIES)}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ConfigError(f"max_skip_fraction {self.max_fraction} must be between 0 and 1")

    def report(self, kind: str, error: LlavakitError) -> None:
        """Raise ``error`` under the ``error`` policy; otherwise count it under ``kind``."""
        if self.policy == "error":
            raise error
        self.counts[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < self.max_examples:
            kept.append(str(error))

    @property
    def total(self) -> int:
        """Number of skipped samples."""
        return sum(self.counts.values())

    def check_fraction(self, num_seen: int) -> None:
        """Raise `DataError` when more than ``max_fraction`` of ``num_seen`` samples were skipped."""
        if num_seen and self.total / num_seen > self.max_fraction:
            raise DataError(
                f"{self.total} of {num_seen} samples ({self.total / num_seen:.2%}) were skipped, more than "
                f"max_skip_fraction={self.max_fraction:.2%}:\n{self.summary()}\n"
                "Fix the data (see `llavakit data inspect`) or raise max_skip_fraction."
            )

    def summary(self) -> str:
        """Counts per kind with example messages, one block per kind."""
        lines = []
        for kind, count in self.counts.most_common():
            lines.append(f"  {kind}: {count}")
            lines.extend(f"    e.g. {message}" for message in self.examples.get(kind, []))
        return "\n".join(lines) if lines else "  none"
