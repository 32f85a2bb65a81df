"""``llavakit data inspect``: validate a dataset and describe it before spending GPU hours on it.

`inspect_data` streams the records through the same parsing, token counting, template rendering and truncation
code as training (`llavakit.data.prepare`), and collects: sample count, modality split, bad samples by kind with
ids and ``file:line`` (JSON errors, missing/unreadable images, invalid conversations, nothing to supervise), token
lengths after image expansion, truncated and dropped counts, and tiles per image. `InspectReport.render` prints
it; ``passed`` is False when the fraction of bad and dropped samples exceeds the threshold (training counts
samples dropped as too long against ``max_skip_fraction`` the same way), or when the data holds no sample at all.

Image sizes come from file headers, checked with the loader's limits (smallest side, largest pixel count). Pixel
data is only decoded with ``decode=True``: then every image of a usable sample goes through the training loader's
`llavakit.anyres.pixels.load_image` in a thread pool (PIL releases the GIL while decoding), so truncated and corrupt
files are found before a run; the report gives images/s. Without it the report says only headers were checked.

Videos are probed as the training scan probes them (demuxed, not decoded: frame counts and token counts); the report
counts samples with videos and frames per video. They need the model's `VideoSpec` (``InspectOptions.video_spec``,
`load_video_spec` reads it from a checkpoint's ``config.json``); without one, video samples are reported as bad
(kind ``video``) with the fix. ``decode`` does not decode videos (a decode per video costs far more than a probe).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llavakit.anyres.pixels import load_image
from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.formats import Record
from llavakit.data.issues import IssueLog
from llavakit.data.mixture import read_data_records
from llavakit.data.prepare import SampleTooLong, count_tiles, prepare_record
from llavakit.data.templates import check_system_prompt, get_template
from llavakit.data.tokenize import SampleEncoder
from llavakit.errors import ConfigError, ImageError

LENGTH_BINS = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BAR_WIDTH = 40
REPORTED_EXAMPLES = 20
DEFAULT_DECODE_WORKERS = min(8, os.cpu_count() or 1)


@dataclass(frozen=True)
class InspectOptions:
    """What to inspect and how strictly.

    Attributes:
        data_path: ``.json`` / ``.jsonl`` / ``.yaml`` mixture.
        image_folder: root of relative image paths.
        template: chat template id.
        system_prompt: replaces the template's default system prompt (as ``data.system_prompt`` in training).
        model_max_length: token cap after image expansion.
        show: number of rendered samples to include, supervised spans marked ⟦ ⟧.
        max_error_fraction: the report fails above this fraction of bad samples.
        seed: seed of ``random:K`` mixture sampling.
        truncation_policy: ``drop`` | ``downscale`` (as in training).
        decode: fully decode every image of a usable sample (finds truncated/corrupt pixel data).
        decode_workers: threads decoding images when ``decode`` is set.
        video_folder: root of relative video paths; empty: ``image_folder``.
        video_spec: the model's video spec (frame sampling, token counts); None: video samples are bad.
    """

    data_path: str
    image_folder: str
    template: str = "vicuna_v1"
    system_prompt: str | None = None
    model_max_length: int = 4096
    show: int = 0
    max_error_fraction: float = 0.0
    seed: int = 0
    truncation_policy: str = "drop"
    decode: bool = False
    decode_workers: int = DEFAULT_DECODE_WORKERS
    video_folder: str = ""
    video_spec: VideoSpec | None = None


@dataclass(frozen=True)
class _ImagesToDecode:
    """The images of one usable sample, and what it added to the report (taken back if an image fails)."""

    where: str
    paths: tuple[Path, ...]
    length: int
    tiles: tuple[int, ...]
    truncated: bool
    downscaled: bool


@dataclass
class InspectReport:
    """Everything `inspect_data` found (see the module docstring)."""

    options: InspectOptions
    issues: IssueLog
    num_samples: int = 0
    num_with_images: int = 0
    num_multi_image: int = 0
    num_with_videos: int = 0
    frames_per_video: Counter = field(default_factory=Counter)
    num_truncated: int = 0
    num_downscaled: int = 0
    num_dropped: int = 0
    dropped_examples: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    tiles_per_image: Counter = field(default_factory=Counter)
    shown: list[str] = field(default_factory=list)
    num_decoded: int = 0
    num_undecodable: int = 0
    decode_seconds: float = 0.0
    to_decode: list[_ImagesToDecode] = field(default_factory=list, repr=False)

    @property
    def num_bad(self) -> int:
        """Samples that cannot be trained on (issues of every kind)."""
        return self.issues.total

    @property
    def num_seen(self) -> int:
        """Samples read, and records too malformed to read."""
        return self.num_samples + self.issues.counts["json"]

    @property
    def passed(self) -> bool:
        """True when the data holds samples and the fraction of bad or dropped ones is within
        ``max_error_fraction``."""
        lost = self.num_bad + self.num_dropped
        return self.num_seen > 0 and lost / self.num_seen <= self.options.max_error_fraction

    def render(self) -> str:
        """The report as text."""
        text_only = self.num_samples - self.num_with_images - self.num_with_videos
        system = (
            "" if self.options.system_prompt is None else f", system prompt {self.options.system_prompt!r}"
        )
        lines = [
            f"data: {self.options.data_path}  (template {self.options.template}{system}, "
            f"model_max_length {self.options.model_max_length})",
            f"samples: {self.num_samples}  with images: {self.num_with_images} (multi-image: {self.num_multi_image})"
            f"{f'  with videos: {self.num_with_videos}' if self.num_with_videos else ''}  text-only: {text_only}",
            f"usable: {len(self.lengths)}  truncated: {self.num_truncated}  downscaled: {self.num_downscaled}  "
            f"dropped (too long): {self.num_dropped}  bad: {self.num_bad}",
            *(f"    e.g. {message}" for message in self.dropped_examples),
            "bad samples by kind:",
            self.issues.summary(),
            "tokens per sample after image expansion:",
            *_histogram(_bin_lengths(self.lengths)),
            "tiles per image:",
            *_histogram([(str(k), v) for k, v in sorted(self.tiles_per_image.items()) if v]),
            *(
                ["frames per video:", *_histogram([(str(k), v) for k, v in sorted(self.frames_per_video.items())])]
                if self.num_with_videos
                else []
            ),
            self._render_decoding(),
        ]
        for number, sample in enumerate(self.shown):
            lines += [f"--- sample {number} (supervised spans in ⟦ ⟧) ---", sample]
        return "\n".join([*lines, self._verdict()])

    def _verdict(self) -> str:
        if not self.num_seen:
            return f"FAIL: {self.options.data_path} holds no samples"
        if self.passed:
            return "PASS"
        return f"FAIL: more than {self.options.max_error_fraction:.2%} of the samples are bad or dropped as too long"

    def _render_decoding(self) -> str:
        if not self.options.decode:
            return (
                "images: only headers were checked (size and limits), pixel data was not decoded; run with "
                "--decode to find truncated or corrupt files"
            )
        rate = self.num_decoded / self.decode_seconds if self.decode_seconds else 0.0
        return (
            f"images: {self.num_decoded} fully decoded in {self.decode_seconds:.1f} s ({rate:.1f} images/s, "
            f"{self.options.decode_workers} threads), {self.num_undecodable} unreadable"
        )


def inspect_data(options: InspectOptions, tokenizer: Any, image_spec: ImageSpec) -> InspectReport:
    """Stream ``options.data_path`` and build an `InspectReport` (never raises on bad samples: it counts them)."""
    template = get_template(options.template, system_prompt=options.system_prompt)
    if options.system_prompt is not None:
        check_system_prompt(template, "--system-prompt")
    encoder = SampleEncoder(tokenizer, template)
    report = InspectReport(options, IssueLog("skip", max_fraction=1.0, max_examples=REPORTED_EXAMPLES))
    records = read_data_records(options.data_path, report.issues, options.seed)
    for record in tqdm(records, desc="inspecting", unit=" samples"):
        report.num_samples += 1
        _inspect_record(record, options, encoder, image_spec, report)
    if options.decode:
        _decode_images(report)
    return report


def _inspect_record(
    record: Record, options: InspectOptions, encoder: SampleEncoder, spec: ImageSpec, report: InspectReport
) -> None:
    images = record.data.get("image")
    if images:
        report.num_with_images += 1
        report.num_multi_image += isinstance(images, list) and len(images) > 1
    elif record.data.get("video"):
        # a sample with both counts as an image sample (upstream's _get_item reads "image" first)
        report.num_with_videos += 1
    try:
        prepared = prepare_record(
            record,
            report.issues,
            image_folder=options.image_folder,
            encoder=encoder,
            spec=spec,
            max_length=options.model_max_length,
            truncation_policy=options.truncation_policy,
            video_folder=options.video_folder or options.image_folder,
            video_spec=options.video_spec,
        )
    except ConfigError as err:  # videos without a video spec: every video sample is unusable, each is counted
        report.issues.report("video", err)
        return
    except SampleTooLong as err:
        report.num_dropped += 1
        if len(report.dropped_examples) < REPORTED_EXAMPLES:
            report.dropped_examples.append(str(err))
        return
    if prepared is None:
        return
    report.lengths.append(prepared.length)
    report.num_truncated += prepared.truncated
    report.num_downscaled += prepared.downscaled
    tiles = tuple(
        count_tiles(size, spec, tiled) for size, tiled in zip(prepared.image_sizes, prepared.image_tiled)
    )
    report.tiles_per_image.update(tiles)
    report.frames_per_video.update(prepared.video_frames)
    if options.decode and prepared.image_paths:
        where = f"{record.location} (sample {record.data.get('id')!r})"
        report.to_decode.append(
            _ImagesToDecode(
                where, prepared.image_paths, prepared.length, tiles, prepared.truncated, prepared.downscaled
            )
        )
    if len(report.shown) < options.show:
        report.shown.append(encoder.render_for_display(prepared.encoded))


def _decode_images(report: InspectReport) -> None:
    """Decode every queued image like the training loader; a sample with an undecodable image becomes bad."""
    paths = [path for item in report.to_decode for path in item.paths]
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, report.options.decode_workers)) as pool:
        # pool.map yields in the order of ``paths``: results are regrouped per sample below
        errors = iter(tqdm(pool.map(_decode_error, paths), total=len(paths), desc="decoding", unit=" images"))
        per_sample = [[next(errors) for _ in item.paths] for item in report.to_decode]
    report.decode_seconds = time.perf_counter() - start
    report.num_decoded = len(paths)
    for item, sample_errors in zip(report.to_decode, per_sample):
        failures = [error for error in sample_errors if error is not None]
        report.num_undecodable += len(failures)
        if failures:
            _take_back(report, item)
            report.issues.report("image", ImageError(f"{item.where}: {failures[0]}"))
    report.to_decode.clear()


def _decode_error(path: Path) -> str | None:
    """The `ImageError` message of decoding ``path`` with the training loader, or None when it decodes."""
    try:
        load_image(path)
    except ImageError as err:
        return str(err)
    return None


def _take_back(report: InspectReport, item: _ImagesToDecode) -> None:
    """Remove a sample found undecodable from the usable counts and histograms."""
    report.lengths.remove(item.length)
    report.num_truncated -= item.truncated
    report.num_downscaled -= item.downscaled
    report.tiles_per_image.subtract(item.tiles)


def _bin_lengths(lengths: list[int]) -> list[tuple[str, int]]:
    counts = Counter()
    for length in lengths:
        upper = next((b for b in LENGTH_BINS[1:] if length < b), None)
        lower = LENGTH_BINS[LENGTH_BINS.index(upper) - 1] if upper else LENGTH_BINS[-1]
        counts[(lower, upper)] += 1
    return [
        (f"[{lo}, {hi})" if hi else f">= {lo}", n)
        for (lo, hi), n in sorted(counts.items(), key=lambda kv: kv[0][0])
    ]


def _histogram(rows: list[tuple[str, int]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    peak = max(count for _, count in rows)
    width = max(len(label) for label, _ in rows)
    return [
        f"  {label:>{width}}: {count:>8} {'█' * max(1, round(BAR_WIDTH * count / peak))}"
        for label, count in rows
    ]


def load_video_spec(config_path: str | None) -> VideoSpec | None:
    """The `VideoSpec` of a checkpoint's ``config.json`` (``llavakit.video_spec``), or of a JSON file holding a
    VideoSpec dict; None without a file or when the checkpoint has no video."""
    if config_path is None:
        return None
    try:
        data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read video spec {config_path}: {err}") from None
    if isinstance(data.get("llavakit"), dict):
        data = data["llavakit"].get("video_spec")
    return None if data is None else VideoSpec.from_dict(data)


def load_tokenizer_and_spec(tokenizer_path: str, image_spec_path: str | None) -> tuple[Any, ImageSpec]:
    """A tokenizer folder loaded offline, and an `ImageSpec` from a JSON file (an ImageSpec dict, or a checkpoint
    ``config.json`` with ``llavakit.image_spec``); the default spec when no file is given."""
    from transformers import AutoTokenizer

    if not Path(tokenizer_path).is_dir():
        raise ConfigError(
            f"tokenizer folder {tokenizer_path} does not exist (pass a checkpoint or tokenizer folder)"
        )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if image_spec_path is None:
        return tokenizer, ImageSpec()
    try:
        data = json.loads(Path(image_spec_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read image spec {image_spec_path}: {err}") from None
    if isinstance(data.get("llavakit"), dict):
        data = data["llavakit"].get("image_spec")
        if data is None:
            raise ConfigError(f"{image_spec_path} has a 'llavakit' section without 'image_spec'")
    return tokenizer, ImageSpec.from_dict(data)
