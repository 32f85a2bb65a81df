"""Plan one sample without decoding pixels: image sizes → visual-token counts → encoded ids → fit the length cap.

Shared by the dataset scan (`llavakit.data.dataset`), ``__getitem__`` and ``llavakit data inspect`` so all three
count tokens the same way. Token counts come from `llavakit.anyres.geometry.count_visual_tokens` on header sizes.

Truncation never cuts through an image: a sample longer than ``max_length`` is cut only when every image token
lies before the cut; otherwise it raises `SampleTooLong` (the ``drop`` policy) or, with ``downscale``, its tiled
images are switched to a single tile, last image first, until it fits. Each image of a multi-image sample is one
tile (``pad``), as LLaVA-NeXT-Interleave trains.

Videos (a model with a `VideoSpec`): each is probed at scan time (`llavakit.data.videos.read_video_probe`, no
decoding), so its token count ``video_spec.count_tokens(frames, grid_side)`` is exact, and, with
``add_time_instruction``, upstream's sentence on the video's length and frame times is written into the sample as
upstream does (``LazySupervisedDataset._get_item``), on the raw text before the placeholder is placed
(`llavakit.data.formats.parse_sample`): the first user turn becomes ``<video>\\n{instruction}\\n{its raw text
without the placeholder}``. Upstream keeps the newline that followed the placeholder, so a turn that began
``<image>\\n`` reads ``...video.\\n\\nQuestion`` (kept, to tokenise as upstream trained). A video's tokens are never cut either: a sample too long through them is dropped (videos have no
smaller form to downscale to).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llavakit.anyres.geometry import count_visual_tokens, grid_shape
from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video import VideoProbe, time_instruction
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.formats import Record, parse_sample
from llavakit.data.images import read_image_size, resolve_image_path
from llavakit.data.issues import IssueLog
from llavakit.data.schema import Sample
from llavakit.data.tokenize import EncodedSample, SampleEncoder
from llavakit.data.videos import read_video_probe, resolve_video_path
from llavakit.errors import ConfigError, DataError, ImageError, VideoError

Size = tuple[int, int]


class SampleTooLong(DataError):
    """The sample exceeds ``max_length`` and cannot be cut without cutting an image's tokens."""


class NoSupervisedTokens(DataError):
    """Nothing in the sample would be trained on (empty replies, or all replies cut by the length cap)."""


@dataclass(frozen=True)
class PreparedSample:
    """A sample with everything known before pixels are decoded.

    Attributes:
        sample: the parsed sample.
        image_paths: resolved image files, in placeholder order.
        image_sizes: ``(height, width)`` of each image, from its header.
        image_tiled: per image, whether AnyRes tiling applies (False: one tile).
        encoded: ids and labels after placeholder expansion and truncation.
        truncated: True when text after the last image was cut to fit ``max_length``.
        downscaled: True when images were reduced to one tile to fit.
        video_paths: resolved video files / frame folders, in ``<video>`` order.
        video_frames: frames sampled from each video (from its probe).
    """

    sample: Sample
    image_paths: tuple[Path, ...]
    image_sizes: tuple[Size, ...]
    image_tiled: tuple[bool, ...]
    encoded: EncodedSample
    truncated: bool = False
    downscaled: bool = False
    video_paths: tuple[Path, ...] = ()
    video_frames: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        """Tokens after image expansion and truncation."""
        return len(self.encoded.input_ids)


def count_tiles(image_hw: Size, spec: ImageSpec, tiled: bool) -> int:
    """Tiles the vision encoder sees for one image: base view + grid when tiled AnyRes, else 1."""
    if not (tiled and spec.uses_anyres):
        return 1
    rows, cols = grid_shape(image_hw, spec)
    return 1 + rows * cols


def default_tiling(num_images: int) -> tuple[bool, ...]:
    """Single images are tiled (per the spec); each image of a multi-image sample is one tile."""
    return (num_images == 1,) * num_images


def encode_fitted(
    encoder: SampleEncoder,
    sample: Sample,
    image_sizes: Sequence[Size],
    image_tiled: Sequence[bool],
    spec: ImageSpec,
    max_length: int,
    video_frames: Sequence[int] = (),
    video_spec: VideoSpec | None = None,
) -> tuple[EncodedSample, bool]:
    """Encode with exact image (and video: ``video_frames`` per video, counted by ``video_spec``) token counts and
    cut to ``max_length``; returns (encoded, truncated).

    Raises:
        SampleTooLong: when the cut would go through an image's or a video's tokens.
    """
    counts = [count_visual_tokens(size, spec, tiled=tiled) for size, tiled in zip(image_sizes, image_tiled)]
    video_counts = [video_spec.count_tokens(n, spec.grid_side) for n in video_frames] if video_spec else []
    try:
        encoded = encoder.encode(sample.conversation, counts, video_token_counts=video_counts)
    except DataError as err:
        raise DataError(f"sample {sample.id!r} ({sample.location}): {err}") from None
    if len(encoded.input_ids) <= max_length:
        return encoded, False
    if any(start + length > max_length for start, length in [*encoded.image_spans, *encoded.video_spans]):
        raise SampleTooLong(
            f"sample {sample.id!r} ({sample.location}) has {len(encoded.input_ids)} tokens after image/video "
            f"expansion, more than model_max_length={max_length}, and the cut would go through an image or video"
        )
    cut = EncodedSample(
        encoded.input_ids[:max_length], encoded.labels[:max_length], encoded.image_spans, encoded.video_spans
    )
    return cut, True


def probe_videos(
    sample: Sample, video_folder: str | Path, video_spec: VideoSpec | None
) -> tuple[tuple[Path, ...], list[VideoProbe]]:
    """Resolved paths and probes of the sample's videos.

    Raises:
        ConfigError: the sample has videos but the model none (``video_spec`` None).
        VideoError: a video is missing or unreadable.
    """
    if not sample.videos:
        return (), []
    if video_spec is None:
        raise ConfigError(
            f"sample {sample.id!r} ({sample.location}) has a video but the model has no video support: build it "
            "with a video spec (training: model.video_spec: {frames_upbound: 32, ...}; Python: "
            "LlavaNextModel.from_parts(..., video_spec=VideoSpec(...))), or remove the video samples"
        )
    paths = tuple(resolve_video_path(video_folder, video) for video in sample.videos)
    return paths, [read_video_probe(path, video_spec) for path in paths]


def prepare_sample(
    sample: Sample,
    *,
    image_folder: str | Path,
    encoder: SampleEncoder,
    spec: ImageSpec,
    max_length: int,
    truncation_policy: str = "drop",
    video_paths: tuple[Path, ...] = (),
    video_probes: Sequence[VideoProbe] = (),
    video_spec: VideoSpec | None = None,
) -> PreparedSample:
    """Read image headers, count tokens (videos': from their probes, `probe_videos`), encode and fit one sample.

    Raises:
        ImageError: an image is missing or its header is unreadable.
        SampleTooLong: too long under the chosen policy.
        NoSupervisedTokens: nothing is left to supervise.
        DataError: the template cannot render it.
    """
    frames = tuple(probe.num_frames for probe in video_probes)
    paths = tuple(resolve_image_path(image_folder, image) for image in sample.images)
    sizes = tuple(read_image_size(path) for path in paths)
    tiled = list(default_tiling(len(paths)))
    downscaled = False
    while True:
        try:
            encoded, truncated = encode_fitted(encoder, sample, sizes, tiled, spec, max_length, frames, video_spec)
            break
        except SampleTooLong:
            reducible = [i for i, t in enumerate(tiled) if t and spec.uses_anyres]
            if truncation_policy != "downscale" or not reducible:
                raise
            tiled[reducible[-1]] = False
            downscaled = True
    if encoded.num_supervised == 0:
        raise NoSupervisedTokens(
            f"sample {sample.id!r} ({sample.location}) has no supervised token (empty replies, or every reply was "
            "cut by model_max_length); fix the sample or raise model_max_length"
        )
    return PreparedSample(
        sample, paths, sizes, tuple(tiled), encoded, truncated, downscaled, video_paths, frames
    )


def prepare_record(
    record: Record,
    issues: IssueLog,
    *,
    image_folder: str | Path,
    encoder: SampleEncoder,
    spec: ImageSpec,
    max_length: int,
    truncation_policy: str = "drop",
    video_folder: str | Path = "",
    video_spec: VideoSpec | None = None,
) -> PreparedSample | None:
    """`prepare_sample` of one raw JSON record, with unusable records reported to ``issues`` (its skip policy).

    Returns:
        The prepared sample, or None when the record was reported (kinds ``image``, ``video``,
        ``no_supervised_tokens``, ``invalid_sample``).

    Raises:
        SampleTooLong: too long under ``truncation_policy``; the caller counts the drop.
        DataError: from ``issues`` itself when its policy is ``error``.
    """
    try:
        sample = parse_sample(record)
        video_paths, probes = probe_videos(sample, video_folder, video_spec)
        if probes and video_spec is not None and video_spec.add_time_instruction:
            sample = parse_sample(record, time_instruction(probes[0]))
        return prepare_sample(
            sample,
            image_folder=image_folder,
            encoder=encoder,
            spec=spec,
            max_length=max_length,
            truncation_policy=truncation_policy,
            video_paths=video_paths,
            video_probes=probes,
            video_spec=video_spec,
        )
    except SampleTooLong:
        # Note: a DataError too, but not an issue: drops are counted under the caller's truncation policy.
        raise
    except VideoError as err:
        issues.report("video", VideoError(f"{record.location} (sample {record.data.get('id')!r}): {err}"))
    except ImageError as err:
        issues.report("image", ImageError(f"{record.location} (sample {record.data.get('id')!r}): {err}"))
    except NoSupervisedTokens as err:
        issues.report("no_supervised_tokens", err)
    except DataError as err:
        issues.report("invalid_sample", err)
    return None
