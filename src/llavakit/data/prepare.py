"""Plan one sample without decoding pixels: image sizes → visual-token counts → encoded ids → fit the length cap.

Shared by the dataset scan (`llavakit.data.dataset`), ``__getitem__`` and ``llavakit data inspect`` so all three
count tokens the same way. Token counts come from `llavakit.anyres.geometry.count_visual_tokens` on header sizes.

Truncation never cuts through an image: a sample longer than ``max_length`` is cut only when every image token
lies before the cut; otherwise it raises `SampleTooLong` (the ``drop`` policy) or, with ``downscale``, its tiled
images are switched to a single tile, last image first, until it fits. Each image of a multi-image sample is one
tile (``pad``), as LLaVA-NeXT-Interleave trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llavakit.anyres.geometry import count_visual_tokens, grid_shape
from llavakit.anyres.spec import ImageSpec
from llavakit.data.formats import Record, parse_sample
from llavakit.data.images import read_image_size, resolve_image_path
from llavakit.data.issues import IssueLog
from llavakit.data.schema import Sample
from llavakit.data.tokenize import EncodedSample, SampleEncoder
from llavakit.errors import DataError, ImageError

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
    """

    sample: Sample
    image_paths: tuple[Path, ...]
    image_sizes: tuple[Size, ...]
    image_tiled: tuple[bool, ...]
    encoded: EncodedSample
    truncated: bool = False
    downscaled: bool = False

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
) -> tuple[EncodedSample, bool]:
    """Encode with exact image token counts and cut to ``max_length``; returns (encoded, truncated).

    Raises:
        SampleTooLong: when the cut would go through an image's tokens.
    """
    counts = [count_visual_tokens(size, spec, tiled=tiled) for size, tiled in zip(image_sizes, image_tiled)]
    try:
        encoded = encoder.encode(sample.conversation, counts)
    except DataError as err:
        raise DataError(f"sample {sample.id!r} ({sample.location}): {err}") from None
    if len(encoded.input_ids) <= max_length:
        return encoded, False
    if any(start + length > max_length for start, length in encoded.image_spans):
        raise SampleTooLong(
            f"sample {sample.id!r} ({sample.location}) has {len(encoded.input_ids)} tokens after image expansion, "
            f"more than model_max_length={max_length}, and the cut would go through an image"
        )
    cut = EncodedSample(encoded.input_ids[:max_length], encoded.labels[:max_length], encoded.image_spans)
    return cut, True


def prepare_sample(
    sample: Sample,
    *,
    image_folder: str | Path,
    encoder: SampleEncoder,
    spec: ImageSpec,
    max_length: int,
    truncation_policy: str = "drop",
) -> PreparedSample:
    """Read image headers, count tokens, encode and fit one sample.

    Raises:
        ImageError: an image is missing or its header is unreadable.
        SampleTooLong: too long under the chosen policy.
        NoSupervisedTokens: nothing is left to supervise.
        DataError: the template cannot render it.
    """
    paths = tuple(resolve_image_path(image_folder, image) for image in sample.images)
    sizes = tuple(read_image_size(path) for path in paths)
    tiled = list(default_tiling(len(paths)))
    downscaled = False
    while True:
        try:
            encoded, truncated = encode_fitted(encoder, sample, sizes, tiled, spec, max_length)
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
    return PreparedSample(sample, paths, sizes, tuple(tiled), encoded, truncated, downscaled)


def prepare_record(
    record: Record,
    issues: IssueLog,
    *,
    image_folder: str | Path,
    encoder: SampleEncoder,
    spec: ImageSpec,
    max_length: int,
    truncation_policy: str = "drop",
) -> PreparedSample | None:
    """`prepare_sample` of one raw JSON record, with unusable records reported to ``issues`` (its skip policy).

    Returns:
        The prepared sample, or None when the record was reported (kinds ``image``, ``no_supervised_tokens``,
        ``invalid_sample``).

    Raises:
        SampleTooLong: too long under ``truncation_policy``; the caller counts the drop.
        DataError: from ``issues`` itself when its policy is ``error``.
    """
    try:
        sample = parse_sample(record)
        return prepare_sample(
            sample,
            image_folder=image_folder,
            encoder=encoder,
            spec=spec,
            max_length=max_length,
            truncation_policy=truncation_policy,
        )
    except SampleTooLong:
        # Note: a DataError too, but not an issue: drops are counted under the caller's truncation policy.
        raise
    except ImageError as err:
        issues.report("image", ImageError(f"{record.location} (sample {record.data.get('id')!r}): {err}"))
    except NoSupervisedTokens as err:
        issues.report("no_supervised_tokens", err)
    except DataError as err:
        issues.report("invalid_sample", err)
    return None
