"""YAML mixtures: strategies, percentages, seeded random subsets identical across 'ranks', clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import chat, write_json

from llavakit.data.issues import IssueLog
from llavakit.data.mixture import read_data_records, select_indices
from llavakit.errors import ConfigError


@pytest.fixture
def mixture(tmp_path):
    write_json(tmp_path / "a.json", [chat("q", "a", sample_id=f"a{i}") for i in range(10)])
    write_json(tmp_path / "b.jsonl", [chat("q", "a", sample_id=f"b{i}") for i in range(20)], jsonl=True)
    path = tmp_path / "mix.yaml"
    path.write_text(
        "datasets:\n"
        "  - json_path: a.json\n    sampling_strategy: first:30%\n"
        "  - json_path: b.jsonl\n    sampling_strategy: random:5\n"
        f"  - json_path: {tmp_path / 'a.json'}\n    sampling_strategy: end:2\n"
    )
    return path


def ids(path, seed=0):
    return [r.data["id"] for r in read_data_records(path, IssueLog(), seed)]


def test_mixture_applies_each_strategy(mixture):
    selected = ids(mixture)
    assert selected[:3] == ["a0", "a1", "a2"]  # ceil(30% of 10)
    assert len(selected) == 3 + 5 + 2 and selected[-2:] == ["a8", "a9"]
    assert all(i.startswith("b") for i in selected[3:8])


def test_random_subset_is_seeded_and_identical_on_every_rank(mixture):
    assert ids(mixture, seed=7) == ids(mixture, seed=7)  # what two ranks compute
    assert ids(mixture, seed=7) != ids(mixture, seed=8)


def test_percent_rounds_up_like_upstream():
    assert select_indices(7, "first:10%", np.random.default_rng(0)) == [0]
    assert select_indices(7, "all", np.random.default_rng(0)) == list(range(7))


@pytest.mark.parametrize("strategy", ["some:3", "random", "first:-1"])
def test_bad_strategy_is_an_error(tmp_path, strategy):
    write_json(tmp_path / "a.json", [chat("q", "a")])
    path = tmp_path / "mix.yaml"
    path.write_text(f"datasets:\n  - json_path: a.json\n    sampling_strategy: '{strategy}'\n")
    with pytest.raises(ConfigError, match=r"datasets\[0\].sampling_strategy"):
        ids(path)


def test_asking_for_more_than_the_file_has_is_an_error(tmp_path):
    write_json(tmp_path / "a.json", [chat("q", "a")])
    path = tmp_path / "mix.yaml"
    path.write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: first:5\n")
    with pytest.raises(ConfigError, match="asks for 5 records but the file has 1"):
        ids(path)


def test_missing_datasets_list_is_an_error(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("data: []\n")
    with pytest.raises(ConfigError, match="non-empty 'datasets:' list"):
        ids(path)
