"""The map-style training dataset: a scanned, validated list of samples whose pixels are decoded lazily.

Usage (trainer)::

    dataset = build_dataset(DataConfig(data_path=..., image_folder=..., template="qwen_2"), tokenizer, image_spec,
                            index_dir=run_dir / ".index", context=context)
    print(dataset.stats.summary())            # kept / truncated / dropped / skipped-by-kind
    loader = DataLoader(dataset, batch_sampler=..., collate_fn=build_collator(tokenizer))

Construction scans every record once without decoding pixels (image sizes come from file headers): it parses,
counts visual tokens, encodes, applies the truncation policy and checks that something is supervised. Bad samples
go to the `IssueLog` (raise, or skip and count); over-long samples are dropped or downscaled and counted. The
scan yields exact token ``lengths`` (and signed ``modality_lengths``) for the samplers and for packing. With an
``index_dir`` the scan is stored there once and shared by ranks, stages and runs (`llavakit.data.index`); the
dataset then holds arrays, and each `Entry` is decoded from them on access.

``__getitem__`` re-encodes the sample (cheap, deterministic) and decodes its images and videos in the DataLoader
worker. An image whose header was fine but whose data is corrupt (or a video that fails to decode) raises
`ImageError` (`VideoError`) naming the sample under ``skip_policy="error"``; under ``"skip"`` the item is None and
the collator drops it and counts it in ``num_skipped``. Videos need the model's `VideoSpec` (``video_spec``): the
scan probes them for their frame counts (`llavakit.data.videos`) and stores the counts in the index. With ``cache_samples`` each
item is built once and then served from memory (per worker process): for small datasets trained for many epochs,
where decoding and encoding are a measurable share of a CPU step (the demo: ~7 %).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.config import DataConfig
from llavakit.data.images import load_pixels
from llavakit.data.index import Entry, ScanIndex, ScanPart, scan_key, shared_scan
from llavakit.data.issues import EXAMPLES_PER_KIND, IssueLog
from llavakit.data.mixture import read_data_records
from llavakit.data.prepare import SampleTooLong, encode_fitted, prepare_record
from llavakit.data.templates import ChatTemplate, check_system_prompt, get_template
from llavakit.data.tokenize import SampleEncoder
from llavakit.data.videos import load_frames
from llavakit.distributed import DistContext
from llavakit.errors import DataError, ImageError

__all__ = ["DatasetStats", "Entry", "LlavaDataset", "build_dataset"]


@dataclass
class DatasetStats:
    """Counts from the scan.

    Attributes:
        num_records: records read (valid JSON objects).
        num_kept: samples in the dataset.
        num_truncated: kept samples whose trailing text was cut to ``model_max_length``.
        num_downscaled: kept samples whose images were reduced to one tile to fit.
        num_dropped_too_long: samples dropped because a cut would go through an image.
        issues: bad samples by kind (``json``, ``invalid_sample``, ``image``, ``video``,
            ``no_supervised_tokens``).
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

    def to_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready data (``data_stats.json``, the index's ``meta.json``)."""
        return {
            "num_records": self.num_records,
            "num_kept": self.num_kept,
            "num_truncated": self.num_truncated,
            "num_downscaled": self.num_downscaled,
            "num_dropped_too_long": self.num_dropped_too_long,
            "num_skipped": self.issues.total,
            "skipped": dict(self.issues.counts),
            "dropped_examples": list(self.dropped_examples),
            "skipped_examples": {kind: list(messages) for kind, messages in self.issues.examples.items()},
        }

    @classmethod
    def from_dicts(cls, parts: list[dict[str, Any]], issues: IssueLog) -> DatasetStats:
        """The sum of several `to_dict` counts (the parts of a scan), with ``issues`` filled from them."""
        stats = cls(issues)
        for part in parts:
            stats.num_records += part["num_records"]
            stats.num_kept += part["num_kept"]
            stats.num_truncated += part["num_truncated"]
            stats.num_downscaled += part["num_downscaled"]
            stats.num_dropped_too_long += part["num_dropped_too_long"]
            room = EXAMPLES_PER_KIND - len(stats.dropped_examples)
            stats.dropped_examples.extend(part["dropped_examples"][:room])
            issues.counts.update(Counter(part["skipped"]))
            for kind, messages in part["skipped_examples"].items():
                kept = issues.examples.setdefault(kind, [])
                kept.extend(messages[: issues.max_examples - len(kept)])
        return stats


class LlavaDataset(Dataset):
    """Scanned samples; items are dicts ready for `llavakit.data.collate.Collator`.

    Args:
        entries: the kept samples (decoded on access).
        encoder: tokenizer + template.
        image_spec: preprocessing spec (token counts and pixels).
        model_max_length: token cap (same as in the scan).
        skip_policy: ``error`` | ``skip`` for images that fail to decode in ``__getitem__``.
        stats: the scan's counts.
        cache_samples: keep every built item in memory (its pixels included) and serve it again from there.
        video_spec: the model's video spec (frame sampling, token counts); None: no sample has videos.
    """

    def __init__(
        self,
        entries: ScanIndex,
        encoder: SampleEncoder,
        image_spec: ImageSpec,
        model_max_length: int,
        skip_policy: str,
        stats: DatasetStats,
        cache_samples: bool = False,
        video_spec: VideoSpec | None = None,
    ) -> None:
        self.entries = entries
        self.video_spec = video_spec
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
        return self.entries.lengths

    @property
    def modality_lengths(self) -> list[int]:
        """Token lengths, positive for samples with images or videos and negative for text-only ones (upstream
        convention: a video sample is multimodal)."""
        visual = [image or video for image, video in zip(self.entries.has_image, self.entries.has_video)]
        return [n if multimodal else -n for n, multimodal in zip(self.entries.lengths, visual)]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """One example: ``input_ids [T]``, ``labels [T]``, ``pixel_values [n_tiles,3,S,S]`` or None,
        ``image_sizes`` [(h, w)], ``image_tiled`` [bool], ``pixel_values_videos [ΣF,3,S,S]`` or None,
        ``video_frames`` [F per video], ``id``; None when skipped (see module docstring).
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
            entry.video_frames,
            self.video_spec,
        )
        try:
            tiles = [load_pixels(p, self.image_spec, t) for p, t in zip(entry.image_paths, entry.image_tiled)]
            frames = self._load_videos(entry)
        except ImageError as err:
            if self.skip_policy == "error":
                raise type(err)(f"sample {entry.sample.id!r} ({entry.sample.location}): {err}") from None
            return None
        return {
            "id": entry.sample.id,
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": torch.cat(tiles) if tiles else None,
            "image_sizes": list(entry.image_sizes),
            "image_tiled": list(entry.image_tiled),
            "pixel_values_videos": torch.cat(frames) if frames else None,
            "video_frames": list(entry.video_frames),
        }

    def _load_videos(self, entry: Entry) -> list[torch.Tensor]:
        """Each video's ``[F, 3, S, S]`` frames, F as the scan counted (`VideoError` otherwise)."""
        if not entry.video_paths:
            return []
        if self.video_spec is None:
            raise DataError(f"sample {entry.sample.id!r} has videos but the dataset was built without a video_spec")
        return [
            load_frames(path, self.image_spec, self.video_spec, frames)
            for path, frames in zip(entry.video_paths, entry.video_frames)
        ]


def build_dataset(
    config: DataConfig,
    tokenizer: Any,
    image_spec: ImageSpec,
    template: ChatTemplate | None = None,
    *,
    index_dir: str | Path | None = None,
    context: DistContext | None = None,
    video_spec: VideoSpec | None = None,
) -> LlavaDataset:
    """Read, validate and scan ``config.data_path``, or load the stored scan; see the module docstring.

    Args:
        config: data settings.
        tokenizer: transformers tokenizer with ``<image>``.
        image_spec: the model's preprocessing spec.
        template: overrides ``config.template`` / ``config.upstream_quirks`` / ``config.system_prompt`` when given.
        index_dir: where the scan is stored and looked up (`llavakit.data.index`); None scans in memory.
        context: this process's rank; with a process group every rank scans a share (needs ``index_dir``).
        video_spec: the model's video spec; None: a sample with a video raises `ConfigError` (no video support).

    Raises:
        ConfigError: ``config.system_prompt`` is set for a template that ignores it in training, or a sample has a
            video and ``video_spec`` is None.
        DataError / ImageError: the first bad sample under ``skip_policy="error"``, or too many skipped samples.
    """
    if template is None:
        template = get_template(config.template, config.upstream_quirks, config.system_prompt)
        if config.system_prompt is not None:
            check_system_prompt(template, "data.system_prompt")
    encoder = SampleEncoder(tokenizer, template)

    def scan(rank: int, world: int) -> ScanPart:
        return _scan_share(config, encoder, image_spec, rank, world, video_spec)

    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        issues = IssueLog(config.skip_policy, config.max_skip_fraction)
        return DatasetStats.from_dicts(parts, issues).to_dict()

    key = scan_key(config, tokenizer, image_spec, template, video_spec) if index_dir is not None else {}
    index = shared_scan(Path(index_dir) if index_dir is not None else None, key, scan, merge, context)
    issues = IssueLog(config.skip_policy, config.max_skip_fraction)
    stats = DatasetStats.from_dicts([index.stats], issues)
    issues.check_fraction(stats.num_records + issues.counts["json"])
    _check_dropped(stats, issues, config, stats.num_records + issues.counts["json"])
    if not len(index):
        raise DataError(f"{config.data_path}: no usable sample\n{stats.summary()}")
    return LlavaDataset(
        index,
        encoder,
        image_spec,
        config.model_max_length,
        config.skip_policy,
        stats,
        config.cache_samples,
        video_spec,
    )


def _check_dropped(stats: DatasetStats, issues: IssueLog, config: DataConfig, num_seen: int) -> None:
    """Samples dropped as too long count against ``max_skip_fraction`` together with the skipped ones.

    Why: a ``max_length`` too small for the images drops every image sample without any single sample being bad;
    training would then run on what is left (e.g. the text-only samples) and exit 0.

    Raises:
        DataError: the counts, examples and the three ways out.
    """
    lost = issues.total + stats.num_dropped_too_long
    if not stats.num_dropped_too_long or not num_seen or lost / num_seen <= config.max_skip_fraction:
        return
    examples = "".join(f"\n    e.g. {message}" for message in stats.dropped_examples)
    raise DataError(
        f"{config.data_path}: {stats.num_dropped_too_long} of {num_seen} samples are longer than max_length "
        f"{config.model_max_length} where only a cut through an image would shorten them, and were dropped "
        f"({lost / num_seen:.2%} lost with the skipped ones, more than max_skip_fraction="
        f"{config.max_skip_fraction:.2%}){examples}\nRaise data.max_length, use data.truncation_policy=downscale, "
        "or raise data.max_skip_fraction to train without them"
    )


def _scan_share(
    config: DataConfig,
    encoder: SampleEncoder,
    spec: ImageSpec,
    rank: int,
    world: int,
    video_spec: VideoSpec | None = None,
) -> ScanPart:
    """Scan records ``rank, rank + world, ...`` of the stream. Every rank reads every record (a small share of the
    cost) so mixtures sample identically; unreadable records are counted by rank 0 only."""
    reading = IssueLog(config.skip_policy, max_examples=EXAMPLES_PER_KIND)
    stats = DatasetStats(IssueLog(config.skip_policy))
    part = ScanPart()
    for number, record in enumerate(read_data_records(config.data_path, reading, config.seed)):
        if number % world != rank:
            continue
        stats.num_records += 1
        entry = _scan_record(record, config, encoder, spec, stats, video_spec)
        if entry is not None:
            part.records.append(number)
            part.entries.append(entry)
    if rank == 0:
        stats.issues.counts.update(reading.counts)
        for kind, messages in reading.examples.items():
            stats.issues.examples.setdefault(kind, []).extend(messages)
    stats.num_kept = len(part.entries)
    part.stats = stats.to_dict()
    return part


def _scan_record(
    record: Any,
    config: DataConfig,
    encoder: SampleEncoder,
    spec: ImageSpec,
    stats: DatasetStats,
    video_spec: VideoSpec | None = None,
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
            video_folder=config.video_root,
            video_spec=video_spec,
        )
    except SampleTooLong as err:
        stats.num_dropped_too_long += 1
        if len(stats.dropped_examples) < EXAMPLES_PER_KIND:
            stats.dropped_examples.append(str(err))
        return None
    if prepared is None:
        return None
    stats.num_truncated += prepared.truncated
    stats.num_downscaled += prepared.downscaled
    return Entry(
        prepared.sample,
        prepared.image_paths,
        prepared.image_sizes,
        prepared.image_tiled,
        prepared.length,
        prepared.video_paths,
        prepared.video_frames,
    )
