"""The map-style training dataset: a scanned, validated list of samples whose pixels are decoded lazily.

Usage (trainer)::

    dataset = build_dataset(DataConfig(data_path=..., image_folder=..., template="qwen_2"), tokenizer, image_spec)
    print(dataset.stats.summary())            # kept / truncated / dropped / skipped-by-kind
    loader = DataLoader(dataset, batch_sampler=..., collate_fn=build_collator(tokenizer))

Construction scans every record once without decoding pixels (image sizes come from file headers): it parses,
counts visual tokens, encodes, applies the truncation policy and checks that something is supervised. Bad samples
go to the `IssueLog` (raise, or skip and count); over-long samples are dropped or downscaled and counted. The
scan yields exact token ``lengths`` (and signed ``modality_lengths``) for the samplers and for packing.

``__getitem__`` re-encodes the sample (cheap, deterministic) and decodes its images in the DataLoader worker. An
image whose header was fine but whose data is corrupt raises `ImageError` under ``skip_policy="error"``; under
``"skip"`` the item is None and the collator drops it and counts it in ``num_skipped``. With ``cache_samples`` each
item is built once and then served from memory (per worker process): for small datasets trained for many epochs,
where decoding and encoding are a measurable share of a CPU step (the demo: ~7 %).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from llavakit.anyres.spec import ImageSpec
from llavakit.data.config import DataConfig
from llavakit.data.images import load_pixels
from llavakit.data.issues import IssueLog
from llavakit.data.mixture import read_data_records
from llavakit.data.prepare import SampleTooLong, encode_fitted, prepare_record
from llavakit.data.schema import Sample
from llavakit.data.templates import ChatTemplate, check_system_prompt, get_template
from llavakit.data.tokenize import SampleEncoder
from llavakit.errors import DataError, ImageError

Size = tuple[int, int]


@dataclass(frozen=True)
class Entry:
    """What the dataset keeps per sample after the scan (no token ids: they are rebuilt in ``__getitem__``)."""

    sample: Sample
    image_paths: tuple[Path, ...]
    image_sizes: tuple[Size, ...]
    image_tiled: tuple[bool, ...]
    length: int


@dataclass
class DatasetStats:
    """Counts from the scan.

    Attributes:
        num_records: records read (valid JSON objects).
        num_kept: samples in the dataset.
        num_truncated: kept samples whose trailing text was cut to ``model_max_length``.
        num_downscaled: kept samples whose images were reduced to one tile to fit.
        num_dropped_too_long: samples dropped because a cut would go through an image.
        issues: bad samples by kind (``json``, ``invalid_sample``, ``image``, ``no_supervised_tokens``).
    """

    issues: IssueLog
    num_records: int = 0
    num_kept: int = 0
    num_truncated: int = 0
    num_downscaled: int = 0
    num_dropped_too_long: int = 0
    dropped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A human-readable report."""
        return (
            f"records: {self.num_records}, kept: {self.num_kept}, truncated: {self.num_truncated}, "
            f"downscaled: {self.num_downscaled}, dropped (too long): {self.num_dropped_too_long}, "
            f"skipped (bad): {self.issues.total}\n{self.issues.summary()}"
        )


class LlavaDataset(Dataset):
    """Scanned samples; items are dicts ready for `llavakit.data.collate.Collator`.

    Args:
        entries: the kept samples.
        encoder: tokenizer + template.
        image_spec: preprocessing spec (token counts and pixels).
        model_max_length: token cap (same as in the scan).
        skip_policy: ``error`` | ``skip`` for images that fail to decode in ``__getitem__``.
        stats: the scan's counts.
        cache_samples: keep every built item in memory (its pixels included) and serve it again from there.
    """

    def __init__(
        self,
        entries: list[Entry],
        encoder: SampleEncoder,
        image_spec: ImageSpec,
        model_max_length: int,
        skip_policy: str,
        stats: DatasetStats,
        cache_samples: bool = False,
    ) -> None:
        self.entries = entries
        self.encoder = encoder
        self.image_spec = image_spec
        self.model_max_length = model_max_length
        self.skip_policy = skip_policy
        self.stats = stats
        self._cache: dict[int, dict[str, Any] | None] | None = {} if cache_samples else None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def lengths(self) -> list[int]:
        """Exact tokens per sample after image expansion and truncation."""
        return [entry.length for entry in self.entries]

    @property
    def modality_lengths(self) -> list[int]:
        """Token lengths, positive for samples with images and negative for text-only ones (upstream convention)."""
        return [entry.length if entry.image_paths else -entry.length for entry in self.entries]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """One example: ``input_ids [T]``, ``labels [T]``, ``pixel_values [n_tiles,3,S,S]`` or None,
        ``image_sizes`` [(h, w)], ``image_tiled`` [bool], ``id``; None when skipped (see module docstring).
        Callers must not modify the item: with ``cache_samples`` the same one is returned every time."""
        if self._cache is None:
            return self._build_item(index)
        if index not in self._cache:
            self._cache[index] = self._build_item(index)
        return self._cache[index]

    def _build_item(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        encoded, _ = encode_fitted(
            self.encoder,
            entry.sample,
            entry.image_sizes,
            entry.image_tiled,
            self.image_spec,
            self.model_max_length,
        )
        try:
            tiles = [load_pixels(p, self.image_spec, t) for p, t in zip(entry.image_paths, entry.image_tiled)]
        except ImageError as err:
            if self.skip_policy == "error":
                raise ImageError(f"sample {entry.sample.id!r} ({entry.sample.location}): {err}") from None
            return None
        return {
            "id": entry.sample.id,
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": torch.cat(tiles) if tiles else None,
            "image_sizes": list(entry.image_sizes),
            "image_tiled": list(entry.image_tiled),
        }


def build_dataset(
    config: DataConfig, tokenizer: Any, image_spec: ImageSpec, template: ChatTemplate | None = None
) -> LlavaDataset:
    """Read, validate and scan ``config.data_path``; see the module docstring.

    Args:
        config: data settings.
        tokenizer: transformers tokenizer with ``<image>``.
        image_spec: the model's preprocessing spec.
        template: overrides ``config.template`` / ``config.upstream_quirks`` / ``config.system_prompt`` when given.

    Raises:
        ConfigError: ``config.system_prompt`` is set for a template that ignores it in training.
        DataError / ImageError: the first bad sample under ``skip_policy="error"``, or too many skipped samples.
    """
    if template is None:
        template = get_template(config.template, config.upstream_quirks, config.system_prompt)
        if config.system_prompt is not None:
            check_system_prompt(template, "data.system_prompt")
    encoder = SampleEncoder(tokenizer, template)
    issues = IssueLog(config.skip_policy, config.max_skip_fraction)
    stats = DatasetStats(issues)
    entries = []
    for record in read_data_records(config.data_path, issues, config.seed):
        stats.num_records += 1
        entry = _scan_record(record, config, encoder, image_spec, stats)
        if entry is not None:
            entries.append(entry)
    stats.num_kept = len(entries)
    issues.check_fraction(stats.num_records + issues.counts["json"])
    if not entries:
        raise DataError(f"{config.data_path}: no usable sample\n{stats.summary()}")
    return LlavaDataset(
        entries, encoder, image_spec, config.model_max_length, config.skip_policy, stats, config.cache_samples
    )


def _scan_record(
    record: Any, config: DataConfig, encoder: SampleEncoder, spec: ImageSpec, stats: DatasetStats
) -> Entry | None:
    try:
        prepared = prepare_record(
            record,
            stats.issues,
            image_folder=config.image_folder,
            encoder=encoder,
            spec=spec,
            max_length=config.model_max_length,
            truncation_policy=config.truncation_policy,
        )
    except SampleTooLong as err:
        stats.num_dropped_too_long += 1
        if len(stats.dropped_examples) < 5:
            stats.dropped_examples.append(str(err))
        return None
    if prepared is None:
        return None
    stats.num_truncated += prepared.truncated
    stats.num_downscaled += prepared.downscaled
    return Entry(prepared.sample, prepared.image_paths, prepared.image_sizes, prepared.image_tiled, prepared.length)
