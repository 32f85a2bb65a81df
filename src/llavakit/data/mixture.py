"""YAML data mixtures (LLaVA-NeXT format), sampled identically on every rank.

A mixture file lists sources::

    datasets:
      - json_path: captions.json          # relative paths are resolved against the YAML file's folder
        sampling_strategy: first:10%       # all | first:K | end:K | random:K ; K a count or N%
      - json_path: /data/vqa.jsonl
        sampling_strategy: random:5000

``N%`` means ``ceil(N * n / 100)`` of the file's ``n`` records, as upstream. Upstream ``random`` shuffles with the
unseeded global RNG before the trainer seeds it, so every rank may train on a different subset; here ``random:K``
draws with a generator seeded by ``(seed, entry index)``, so every rank and every restart gets the same subset.
`read_data_records` is the one entry point for a ``.json``, ``.jsonl`` or ``.yaml`` data path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from llavakit.data.formats import Record, read_records
from llavakit.data.issues import IssueLog
from llavakit.errors import ConfigError

STRATEGY = re.compile(r"^(all)$|^(first|end|random):(\d+)(%?)$")


@dataclass(frozen=True)
class MixtureEntry:
    """One source of a mixture: a LLaVA JSON/JSONL file and how many of its records to take."""

    json_path: Path
    sampling_strategy: str = "all"


def load_mixture(path: str | Path) -> list[MixtureEntry]:
    """Parse a mixture YAML; `ConfigError` names the entry and field that is wrong."""
    path = Path(path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read data mixture {path}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"data mixture {path} is not UTF-8 (byte {err.object[err.start]:#04x} at offset {err.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path}"
        ) from None
    if (
        not isinstance(content, dict)
        or not isinstance(content.get("datasets"), list)
        or not content["datasets"]
    ):
        raise ConfigError(
            f"{path}: a data mixture needs a non-empty 'datasets:' list of {{json_path, sampling_strategy}}"
        )
    entries = []
    for number, item in enumerate(content["datasets"]):
        if not isinstance(item, dict) or not isinstance(item.get("json_path"), str):
            raise ConfigError(f"{path}: datasets[{number}] needs a 'json_path' string")
        strategy = str(item.get("sampling_strategy", "all")).strip()
        if not STRATEGY.match(strategy):
            raise ConfigError(
                f"{path}: datasets[{number}].sampling_strategy {strategy!r} is not all | first:K | end:K | random:K "
                "(K a count or N%)"
            )
        json_path = Path(item["json_path"])
        entries.append(
            MixtureEntry(json_path if json_path.is_absolute() else path.parent / json_path, strategy)
        )
    return entries


def select_indices(num_records: int, strategy: str, generator: np.random.Generator) -> list[int]:
    """Indices of the records a strategy keeps, in file order."""
    match = STRATEGY.match(strategy)
    if match is None:
        raise ConfigError(f"sampling_strategy {strategy!r} is not all | first:K | end:K | random:K")
    if match.group(1):
        return list(range(num_records))
    kind, amount, percent = match.group(2), int(match.group(3)), match.group(4)
    count = math.ceil(amount * num_records / 100) if percent else amount
    if count > num_records:
        raise ConfigError(
            f"sampling_strategy {strategy!r} asks for {count} records but the file has {num_records}"
        )
    if kind == "first":
        return list(range(count))
    if kind == "end":
        return list(range(num_records - count, num_records))
    return sorted(generator.choice(num_records, size=count, replace=False).tolist())


def read_data_records(data_path: str | Path, issues: IssueLog, seed: int = 0) -> Iterator[Record]:
    """Records of a ``.json``/``.jsonl`` file, or of every source of a ``.yaml``/``.yml`` mixture (sampled)."""
    data_path = Path(data_path)
    if data_path.suffix not in (".yaml", ".yml"):
        yield from read_records(data_path, issues)
        return
    for number, entry in enumerate(load_mixture(data_path)):
        records = list(read_records(entry.json_path, issues))
        generator = np.random.default_rng([seed, number])
        for index in select_indices(len(records), entry.sampling_strategy, generator):
            yield records[index]
