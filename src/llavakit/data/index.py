"""The dataset index: the per-sample scan computed once, stored on disk, shared by every rank, stage and run.

The scan of `llavakit.data.dataset` (parse, tokenise, image header sizes, token counts, truncation) costs about a
millisecond per sample: ~11 minutes for LLaVA-665K, paid by every rank at every stage start before this index. Its
result is a pure function of its inputs, so it is stored under a digest of everything it depends on (`scan_key`):
the data files (path, size, mtime; every file of a mixture and the mixture itself), the tokenizer's serialised
content (not its path), the template with its system prompt and upstream quirks, the image spec, the image folder,
``max_length``, the truncation and skip policies, the mixture seed and this format's version; for a model with video,
also the video spec, the video folder and every referenced video's size and mtime (a frame folder's entry count and
mtime): a video re-encoded in place changes its frame count, hence its token count, which a stale index would get
wrong (images keep their header sizes, so they are not stamped). Stamping costs a read of the records and a
``stat`` per video, against a demux per video for the scan itself.

Where it lives: ``<run_dir>/.index/`` by default (``data.index_dir`` elsewhere). The run folder is already what a
multi-node run must share, so every rank of every node finds the index there; a re-run of the run folder, and each
stage of it that has the same inputs (e.g. eval data, a restart), reuse it. Several runs can point ``data.index_dir``
at one shared folder. Image files are assumed not to change in place (their headers are not re-read on a warm start:
doing so is half the scan); a changed image folder path is part of the key.

Sharing by ranks: every rank reads the records (cheap: ~1 % of the scan) and scans every ``W``-th of them, writes its
part, and rank 0 merges the parts into the index; the others wait for it and then read the index. We chose the split
over "rank 0 scans while the others wait" because it makes a cold start of ``W`` ranks faster, not just no slower
(the scan parallelises perfectly), and every rank ends up reading the same merged files. A rank whose part fails
(a bad sample under ``skip_policy: error``) makes every rank fail, naming the rank that holds the error, instead of
leaving the others waiting.

Format (no pickle anywhere): a folder ``<index_dir>/<digest>/`` of NumPy ``.npy`` arrays (loaded with
``allow_pickle=False``; the sample texts as one UTF-8 byte array, memory-mapped so ranks and DataLoader workers share
the page cache) and ``meta.json`` (version, the whole key, the scan's counts, each file's size and SHA-256). The folder
is written under a temporary name and renamed into place, so a crash leaves no partial index. On load every file is
checked against ``meta.json`` (sizes, hashes, shapes, dtypes); a mismatch is reported and the index rebuilt, never
trusted. A key that differs from an older index of the same data is reported with the components that changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from llavakit import __version__
from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video_spec import VideoSpec
from llavakit.data.config import DataConfig
from llavakit.data.schema import Conversation, Sample, Turn
from llavakit.data.templates import ChatTemplate
from llavakit.distributed import DistContext
from llavakit.errors import DataError

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
# Arrays added with video: an index written before them (image-only by construction) reads as having no videos, so
# existing indexes stay valid; a video dataset's key holds video components no such index has.
VIDEO_ARRAYS = ("video_counts", "video_frames")
META = "meta.json"
NO_INDEX = "no index yet"
Size = tuple[int, int]
# name → (dtype, number of dimensions) of the index arrays.
ARRAYS = {
    "lengths": (np.int64, 1),
    "image_counts": (np.int32, 1),
    "image_sizes": (np.int32, 2),
    "image_tiled": (np.bool_, 1),
    "video_counts": (np.int32, 1),
    "video_frames": (np.int32, 1),
    "sample_offsets": (np.int64, 1),
    "samples": (np.uint8, 1),
}


class IndexCorrupt(DataError):
    """A stored index does not match its ``meta.json`` (truncated, edited, wrong shapes); it is rebuilt."""


@dataclass(frozen=True)
class Entry:
    """What the dataset keeps per sample after the scan (no token ids: they are rebuilt in ``__getitem__``)."""

    sample: Sample
    image_paths: tuple[Path, ...]
    image_sizes: tuple[Size, ...]
    image_tiled: tuple[bool, ...]
    length: int
    video_paths: tuple[Path, ...] = ()
    video_frames: tuple[int, ...] = ()


@dataclass
class ScanPart:
    """The kept samples of one rank's share of the records, and its counts (`DatasetStats.to_dict` layout).

    Attributes:
        records: position of each kept sample in the record stream (merging sorts by it).
        entries: the kept samples, in stream order.
        stats: counts of this part.
    """

    records: list[int] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- key


def data_files(data_path: str | Path) -> list[Path]:
    """The files a data path reads: itself and, for a ``.yaml`` mixture, every source it lists."""
    from llavakit.data.mixture import load_mixture

    path = Path(data_path)
    if path.suffix in (".yaml", ".yml"):
        return [path, *(entry.json_path for entry in load_mixture(path))]
    return [path]


def file_stamp(path: Path) -> dict[str, Any]:
    """Absolute path, size and modification time of a data file; `DataError` when it is missing."""
    try:
        stat = path.stat()
    except OSError as err:
        raise DataError(f"data file {path} cannot be read: {err}") from None
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's serialised files (``save_pretrained``), so two copies of one tokenizer in
    different folders share an index and any change to vocabulary, merges, added or special tokens does not."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llavakit-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        digest = hashlib.sha256(type(tokenizer).__name__.encode())
        for path in sorted(Path(folder).iterdir()):
            content = path.read_bytes()
            if path.name == "tokenizer_config.json":
                # Where it was loaded from is not what it does.
                config = json.loads(content)
                config.pop("name_or_path", None)
                content = json.dumps(config, sort_keys=True).encode()
            digest.update(path.name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()


def video_stamps(config: DataConfig) -> str:
    """SHA-256 over (path, size, mtime) of every video the records name, in record order; a missing one is
    stamped as missing (the scan reports it). A frame folder is stamped by its mtime and entry count."""
    from llavakit.data.issues import IssueLog
    from llavakit.data.mixture import read_data_records
    from llavakit.data.videos import resolve_video_path

    digest = hashlib.sha256()
    reading = IssueLog("skip")  # unreadable records are reported by the scan itself
    for record in read_data_records(config.data_path, reading, config.seed):
        videos = record.data.get("video")
        for video in [videos] if isinstance(videos, str) else videos if isinstance(videos, list) else []:
            path = resolve_video_path(config.video_root or ".", str(video))
            try:
                stat = path.stat()
                entries = len(os.listdir(path)) if path.is_dir() else 0
                stamp = f"{stat.st_size}:{stat.st_mtime_ns}:{entries}"
            except OSError:
                stamp = "missing"
            digest.update(f"{path}\0{stamp}\0".encode())
    return digest.hexdigest()


def scan_key(
    config: DataConfig,
    tokenizer: Any,
    spec: ImageSpec,
    template: ChatTemplate,
    video_spec: VideoSpec | None = None,
) -> dict[str, Any]:
    """Everything the scan of ``config`` depends on (see the module docstring), as a JSON-ready dict."""
    data_path = Path(config.data_path)
    videos = {}
    if video_spec is not None:
        videos = {
            "video_spec": repr(video_spec),
            "video_folder": str(Path(config.video_root or ".").resolve()),
            "videos": video_stamps(config),
        }
    return {
        **videos,
        "version": INDEX_VERSION,
        "llavakit": __version__,
        "data_path": str(data_path.resolve()),
        "data_files": [file_stamp(path) for path in data_files(data_path)],
        # Relative image paths resolve against it (the working directory when empty).
        "image_folder": str(Path(config.image_folder or ".").resolve()),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": repr(template),
        "image_spec": repr(spec),
        "max_length": config.model_max_length,
        "truncation_policy": config.truncation_policy,
        "skip_policy": config.skip_policy,
        "mixture_seed": config.seed if data_path.suffix in (".yaml", ".yml") else None,
    }


def key_digest(key: dict[str, Any]) -> str:
    """Folder name of the index of ``key`` (canonical JSON → SHA-256, 24 hex digits)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the key components that differ (for the rebuild message)."""
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))


# ---------------------------------------------------------------------------------------------------------- arrays


def _encode_sample(entry: Entry) -> bytes:
    sample = entry.sample
    turns = [[turn.role, turn.text] for turn in sample.conversation.turns]
    record = [sample.id, sample.location, sample.conversation.system, turns, list(sample.images)]
    paths = [[str(p) for p in entry.image_paths], list(sample.videos), [str(p) for p in entry.video_paths]]
    return json.dumps([*record, *paths], ensure_ascii=False).encode()


def part_arrays(part: ScanPart) -> dict[str, np.ndarray]:
    """The index arrays (see `ARRAYS`) of one part's entries, in its order."""
    blobs = [_encode_sample(entry) for entry in part.entries]
    sizes = [size for entry in part.entries for size in entry.image_sizes]
    return {
        "lengths": np.array([entry.length for entry in part.entries], dtype=np.int64),
        "image_counts": np.array([len(entry.image_paths) for entry in part.entries], dtype=np.int32),
        "image_sizes": np.array(sizes, dtype=np.int32).reshape(len(sizes), 2),
        "image_tiled": np.array([t for entry in part.entries for t in entry.image_tiled], dtype=np.bool_),
        "video_counts": np.array([len(entry.video_paths) for entry in part.entries], dtype=np.int32),
        "video_frames": np.array([n for entry in part.entries for n in entry.video_frames], dtype=np.int32),
        "sample_offsets": np.concatenate([[0], np.cumsum([len(blob) for blob in blobs], dtype=np.int64)]),
        "samples": np.frombuffer(b"".join(blobs), dtype=np.uint8),
    }


def merge_arrays(parts: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """One index from ``(records [n], arrays)`` parts: samples in record order, texts copied slice by slice."""
    order = np.argsort(np.concatenate([records for records, _ in parts]), kind="stable")
    joined = {name: np.concatenate([arrays[name] for _, arrays in parts]) for name in ARRAYS}
    images = _ragged_gather(parts, order, "image_counts")
    videos = _ragged_gather(parts, order, "video_counts")
    text_base = np.cumsum([0] + [len(arrays["samples"]) for _, arrays in parts])
    text_start = np.concatenate(
        [arrays["sample_offsets"][:-1] + base for (_, arrays), base in zip(parts, text_base)]
    )[order]
    text_stop = np.concatenate(
        [arrays["sample_offsets"][1:] + base for (_, arrays), base in zip(parts, text_base)]
    )[order]
    text = joined["samples"].tobytes()
    return {
        "lengths": joined["lengths"][order],
        "image_counts": joined["image_counts"][order],
        "image_sizes": joined["image_sizes"][images].reshape(-1, 2),
        "image_tiled": joined["image_tiled"][images],
        "video_counts": joined["video_counts"][order],
        "video_frames": joined["video_frames"][videos],
        "sample_offsets": np.concatenate([[0], np.cumsum(text_stop - text_start)]).astype(np.int64),
        "samples": np.frombuffer(
            b"".join(text[start:stop] for start, stop in zip(text_start.tolist(), text_stop.tolist())),
            dtype=np.uint8,
        ),
    }


def _ragged_gather(
    parts: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]], order: np.ndarray, counts_name: str
) -> np.ndarray:
    """Positions, in the parts' concatenated per-item arrays (images, videos), of the items of the samples in
    ``order``; ``counts_name`` holds each sample's number of items."""
    counts = np.concatenate([arrays[counts_name] for _, arrays in parts])[order]
    base = np.cumsum([0] + [int(arrays[counts_name].sum()) for _, arrays in parts])
    start = np.concatenate(
        [
            np.cumsum(arrays[counts_name], dtype=np.int64) - arrays[counts_name] + offset
            for (_, arrays), offset in zip(parts, base)
        ]
    )[order]
    new_start = np.cumsum(counts, dtype=np.int64) - counts
    return np.repeat(start - new_start, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    """Raise `IndexCorrupt` unless the arrays have the dtypes and mutually consistent shapes of an index."""
    for name, (dtype, ndim) in ARRAYS.items():
        array = arrays.get(name)
        if array is None or array.dtype != dtype or array.ndim != ndim:
            raise IndexCorrupt(f"{where}: array {name!r} is missing or not {ndim}-D {np.dtype(dtype)}")
    num, offsets = len(arrays["lengths"]), arrays["sample_offsets"]
    num_images = int(arrays["image_counts"].sum())
    problems = [
        len(arrays["image_counts"]) != num and "image_counts does not have one row per sample",
        arrays["image_sizes"].shape != (num_images, 2) and "image_sizes does not match image_counts",
        len(arrays["image_tiled"]) != num_images and "image_tiled does not match image_counts",
        len(arrays["video_counts"]) != num and "video_counts does not have one row per sample",
        len(arrays["video_frames"]) != int(arrays["video_counts"].sum())
        and "video_frames does not match video_counts",
        len(offsets) != num + 1 and "sample_offsets does not have one row per sample + 1",
        len(offsets)
        and (offsets[0] != 0 or offsets[-1] != len(arrays["samples"]))
        and "samples is truncated",
        len(offsets) > 1 and bool((np.diff(offsets) <= 0).any()) and "sample_offsets is not increasing",
    ]
    for problem in problems:
        if problem:
            raise IndexCorrupt(f"{where}: {problem}")


class ScanIndex(Sequence[Entry]):
    """The scanned samples as arrays; `Entry` objects are decoded on access (a few µs each), so a rank and each of
    its DataLoader workers hold only the arrays, and the sample texts stay in the (shared) page cache.

    Args:
        arrays: see `ARRAYS`, checked with `check_arrays`.
        stats: the scan's counts (`DatasetStats.to_dict`).
        source: where it came from, for messages (a folder, or ``memory``).
    """

    def __init__(self, arrays: dict[str, np.ndarray], stats: dict[str, Any], source: str = "memory") -> None:
        check_arrays(arrays, source)
        self.arrays = arrays
        self.stats = stats
        self.source = source
        self._image_start = np.concatenate([[0], np.cumsum(arrays["image_counts"], dtype=np.int64)])
        self._video_start = np.concatenate([[0], np.cumsum(arrays["video_counts"], dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.arrays["lengths"])

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample after image expansion and truncation."""
        return self.arrays["lengths"].tolist()

    @property
    def has_image(self) -> list[bool]:
        """Whether each sample has at least one image."""
        return (self.arrays["image_counts"] > 0).tolist()

    @property
    def has_video(self) -> list[bool]:
        """Whether each sample has at least one video."""
        return (self.arrays["video_counts"] > 0).tolist()

    def __getitem__(self, index: int) -> Entry:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        start, stop = self.arrays["sample_offsets"][index : index + 2]
        raw = self.arrays["samples"][start:stop].tobytes()
        # an index written before videos holds six fields per sample
        sample_id, location, system, turns, images, paths, *video = json.loads(raw)
        videos, video_paths = video or ([], [])
        conversation = Conversation(tuple(Turn(role, text) for role, text in turns), system)
        first, last = self._image_start[index : index + 2]
        video_first, video_last = self._video_start[index : index + 2]
        return Entry(
            sample=Sample(sample_id, conversation, tuple(images), location, tuple(videos)),
            image_paths=tuple(Path(path) for path in paths),
            image_sizes=tuple((int(h), int(w)) for h, w in self.arrays["image_sizes"][first:last]),
            image_tiled=tuple(bool(t) for t in self.arrays["image_tiled"][first:last]),
            length=int(self.arrays["lengths"][index]),
            video_paths=tuple(Path(path) for path in video_paths),
            video_frames=tuple(int(n) for n in self.arrays["video_frames"][video_first:video_last]),
        )


# ---------------------------------------------------------------------------------------------------------- disk


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_index(
    folder: Path, key: dict[str, Any], arrays: dict[str, np.ndarray], stats: dict[str, Any]
) -> None:
    """Write the index of ``key`` to ``folder`` atomically: a temporary sibling folder renamed into place (removed on
    failure). When ``folder`` appeared meanwhile (another run built the same key) that one is kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".tmp-{folder.name}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        files = {}
        for name in ARRAYS:
            path = temporary / f"{name}.npy"
            np.save(path, arrays[name], allow_pickle=False)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        meta = {"version": INDEX_VERSION, "key": key, "stats": stats, "num_samples": len(arrays["lengths"])}
        (temporary / META).write_text(json.dumps({**meta, "files": files}, indent=1))
        try:
            os.rename(temporary, folder)
        except OSError:
            if not (folder / META).is_file():
                raise
            shutil.rmtree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def read_index(folder: Path, key: dict[str, Any]) -> ScanIndex:
    """Load and verify the index in ``folder``.

    Raises:
        IndexCorrupt: a file is missing, truncated, altered, of the wrong shape, or ``meta.json`` is unreadable or
            holds another key or version.
    """
    try:
        meta = json.loads((folder / META).read_text())
        files = meta["files"]
        stats = meta["stats"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise IndexCorrupt(f"{folder / META}: unreadable ({type(err).__name__}: {err})") from None
    if meta.get("version") != INDEX_VERSION or meta.get("key") != key:
        raise IndexCorrupt(f"{folder / META}: version or key differs from its folder name")
    arrays = {}
    for name in ARRAYS:
        path = folder / f"{name}.npy"
        expected = files.get(path.name) if isinstance(files, dict) else None
        if name in VIDEO_ARRAYS and expected is None and "video_spec" not in key:
            arrays[name] = _no_videos(name, meta.get("num_samples"))
            continue
        if not isinstance(expected, dict) or not path.is_file():
            raise IndexCorrupt(f"{path}: missing")
        if path.stat().st_size != expected.get("bytes") or _sha256(path) != expected.get("sha256"):
            raise IndexCorrupt(f"{path}: size or SHA-256 differs from meta.json (truncated or altered)")
        try:
            arrays[name] = np.load(path, mmap_mode="r" if name == "samples" else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IndexCorrupt(f"{path}: not a NumPy array ({err})") from None
    return ScanIndex(arrays, stats, str(folder))


def _no_videos(name: str, num_samples: Any) -> np.ndarray:
    """A video array of an index written before videos: no video per sample."""
    size = num_samples if name == "video_counts" and isinstance(num_samples, int) else 0
    return np.zeros(size, dtype=ARRAYS[name][0])


def _stale_message(root: Path, key: dict[str, Any]) -> str:
    """Why no stored index matched: the components that changed since the closest index of the same data path."""
    changes = []
    for meta_path in sorted(root.glob(f"*/{META}")):
        try:
            old = json.loads(meta_path.read_text()).get("key", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(old, dict) and old.get("data_path") == key.get("data_path"):
            changes.append((len(key_changes(old, key)), meta_path.parent, key_changes(old, key)))
    if not changes:
        return NO_INDEX
    _, folder, changed = min(changes)
    return f"the index {folder} is stale ({', '.join(changed)} changed)"


# ---------------------------------------------------------------------------------------------------------- ranks


def _world(context: DistContext | None) -> tuple[int, int]:
    if context is None or not context.is_distributed:
        return 0, 1
    return context.rank, context.world_size


def _all_max(value: int, context: DistContext | None) -> int:
    """The largest ``value`` over ranks (itself without a process group); a barrier too."""
    if _world(context)[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _on_every_rank(action: Callable[[], Any], context: DistContext | None, what: str) -> Any:
    """``action()`` on this rank; if it failed on any rank, every rank raises (the failing one its own error)
    instead of the others waiting forever at the next collective."""
    rank, _ = _world(context)
    try:
        result, failure = action(), None
    except Exception as err:  # re-raised below: here as is, on the other ranks as a DataError
        result, failure = None, err
    failed = _all_max(rank + 1 if failure is not None else 0, context)
    if failure is not None:
        raise failure
    if failed:
        raise DataError(f"rank {failed - 1} failed while {what}; its error says why")
    return result


def _save_part(path: Path, part: ScanPart) -> None:
    arrays = part_arrays(part)
    arrays["records"] = np.array(part.records, dtype=np.int64)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        np.savez(handle, **arrays, stats=np.frombuffer(json.dumps(part.stats).encode(), dtype=np.uint8))
    os.replace(temporary, path)


def _load_part(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as content:
        arrays = {name: content[name] for name in content.files}
    stats = json.loads(arrays.pop("stats").tobytes())
    records = arrays.pop("records")
    check_arrays(arrays, str(path))
    return records, arrays, stats


def shared_scan(
    root: Path | None,
    key: dict[str, Any],
    scan: Callable[[int, int], ScanPart],
    merge_stats: Callable[[list[dict[str, Any]]], dict[str, Any]],
    context: DistContext | None = None,
) -> ScanIndex:
    """The scan of ``key``: read from ``root`` when a valid index is there, else computed by all ranks and stored.

    Args:
        root: index folder shared by all ranks; None scans in memory (one process, nothing stored).
        key: everything the scan depends on (`key_digest` names its folder).
        scan: ``scan(rank, world)`` → the `ScanPart` of records ``rank, rank + world, ...``.
        merge_stats: the counts of the whole scan from the parts' (in rank order).
        context: this process's rank; None or no process group: one process.

    Raises:
        DataError: a rank's scan failed, or ranks do not share ``root`` (multi-node runs need shared storage).
    """
    rank, world = _world(context)
    if root is None:
        if world > 1:
            raise DataError("a scan shared by ranks needs an index folder (data.index_dir or the run folder)")
        part = scan(0, 1)
        return ScanIndex(part_arrays(part), merge_stats([part.stats]))
    folder = root / key_digest(key)
    usable = _on_every_rank(
        lambda: rank != 0 or _usable(folder, root, key), context, "checking the data index"
    )
    if _all_max(int(not usable), context):
        build = root / f".build-{folder.name}"
        try:
            _build(folder, build, key, scan, merge_stats, context)
        finally:
            if rank == 0:
                shutil.rmtree(build, ignore_errors=True)
    try:
        return read_index(folder, key)
    except IndexCorrupt as err:
        raise DataError(
            f"rank {rank}: {err}; the index folder must be shared by all ranks and nodes"
        ) from None


def _usable(folder: Path, root: Path, key: dict[str, Any]) -> bool:
    if not folder.exists():
        reason = _stale_message(root, key)
        log = logger.info if reason == NO_INDEX else logger.warning
        log("data index: %s; scanning into %s", reason, folder)
        return False
    try:
        read_index(folder, key)
    except IndexCorrupt as err:
        logger.warning("data index: %s; rebuilding it", err)
        shutil.rmtree(folder)
        return False
    return True


def _build(
    folder: Path,
    build: Path,
    key: dict[str, Any],
    scan: Callable[[int, int], ScanPart],
    merge_stats: Callable[[list[dict[str, Any]]], dict[str, Any]],
    context: DistContext | None,
) -> None:
    """Every rank scans its share into ``build/part-<rank>.npz``; rank 0 merges the parts into ``folder``."""
    rank, world = _world(context)
    if rank == 0:
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
    _all_max(0, context)
    part = _on_every_rank(lambda: scan(rank, world), context, "scanning the data")

    def save() -> None:
        if not build.is_dir():
            raise DataError(
                f"rank {rank} cannot see {build}, made by rank 0: the index folder must be shared by all nodes "
                "(data.index_dir on shared storage)"
            )
        _save_part(build / f"part-{rank}.npz", part)

    _on_every_rank(save, context, "saving its part of the data index")

    def merge() -> None:
        if rank == 0:
            loaded = [_load_part(build / f"part-{number}.npz") for number in range(world)]
            arrays = merge_arrays([(records, part) for records, part, _ in loaded])
            write_index(folder, key, arrays, merge_stats([stats for _, _, stats in loaded]))

    _on_every_rank(merge, context, "writing the data index")
