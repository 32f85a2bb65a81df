"""The bad-input tour through the CLI: every case of `bad_input_cases.CASES` (bad data, checkpoints, flags, runs,
chats, conversions, servers) ends in a clear message naming what is wrong, the expected exit code, and no
traceback; planted pickle payloads never run, and inputs are never destroyed.

The same table writes ``docs/bad-inputs.md`` (``scripts/bad_input_tour.py``).
"""

from __future__ import annotations

from collections import Counter

import pytest
from bad_input_cases import CASES, CATEGORIES, Workspace, build_shared, failures, run_case


@pytest.fixture(scope="module")
def shared(tmp_path_factory, preset_parts, checkpoint):
    return build_shared(tmp_path_factory.mktemp("tour"), preset_parts("debug-clip-llama"), checkpoint)


def test_the_table_covers_every_category_with_distinct_cases():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 70
    counts = Counter(case.category for case in CASES)
    assert set(counts) == set(CATEGORIES)


def _param(case):
    """A case that still fails (``known``: the file to fix) is expected to fail, strictly: once fixed, drop it."""
    marks = [pytest.mark.xfail(strict=True, reason=f"not fixed yet, in {case.known}")] if case.known else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.timeout(120)  # a serve case whose bad flag was accepted would serve forever
@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input(case, shared, tmp_path, capsys):
    ws = Workspace(tmp_path / "case", shared)
    outcome = run_case(case, ws)
    leaked = capsys.readouterr()  # anything written around run_case's capture (loggers bound to old streams)
    outcome.err += leaked.out + leaked.err
    problems = failures(case, outcome, ws)
    assert not problems, f"{case.id}: {'; '.join(problems)}\n--- output ---\n{outcome.text[-3000:]}"
