"""Video files for the data layer: paths, frame counts from a demux (no decoding), and frames in the worker.

Like images (`llavakit.data.images`), a video's token count is known before any pixel is decoded: the scan probes it
(`llavakit.anyres.video.probe_video`: packets counted, a frame folder listed), which gives the frames that will be
sampled and their times, so lengths, packing, truncation and the time instruction are exact at scan time. Frames
are decoded and preprocessed in `load_frames`, inside DataLoader workers, and checked against the scan's frame
count: a file replaced after the scan would otherwise give the model more or fewer frames than it has tokens for.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llavakit.anyres.spec import ImageSpec
from llavakit.anyres.video import VideoProbe, load_video, probe_video, process_frames
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import VideoError

# A "video" key in a JSON/JSONL data file; a cheap byte search before records are parsed to confirm it.
_VIDEO_KEY = re.compile(rb'"video"\s*:')
_FOLDER_HINT = "a sample's video path is its 'video' field under the video folder (data.video_folder)"


def data_has_videos(data_path: str | Path) -> bool:
    """Whether a data file (or any file of a ``.yaml`` mixture) holds a sample with a ``video``: the files' bytes are
    searched first (disk speed), and records are parsed only where a ``"video":`` key appears. Unreadable or
    missing files count as holding none (the dataset scan reports them)."""
    from llavakit.data.index import data_files
    from llavakit.data.issues import IssueLog
    from llavakit.data.mixture import read_data_records
    from llavakit.errors import LlavakitError

    try:
        files = data_files(data_path)
        if not any(_mentions_video(path) for path in files):
            return False
        records = read_data_records(data_path, IssueLog("skip"), 0)
        return any(record.data.get("video") for record in records)
    except (OSError, LlavakitError):
        return False


def _mentions_video(path: Path, chunk: int = 1 << 24) -> bool:
    """Whether the file's bytes hold a ``"video":`` key, read in 16 MiB chunks (data files reach gigabytes)."""
    overlap = b""
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            window = overlap + block
            if _VIDEO_KEY.search(window):
                return True
            overlap = window[-64:]  # a key split across chunks, with any whitespace before its colon
    return False


def resolve_video_path(video_folder: str | Path, relative: str) -> Path:
    """``video_folder / relative`` (upstream ``os.path.join(video_folder, video)``); absolute paths kept."""
    path = Path(relative)
    return path if path.is_absolute() else Path(video_folder) / path


def read_video_probe(path: str | Path, spec: VideoSpec) -> VideoProbe:
    """The frames `load_frames` will sample, without decoding; a missing file's message says where dataset video
    paths come from."""
    try:
        return probe_video(path, spec)
    except VideoError as err:
        if Path(path).exists():
            raise
        raise VideoError(f"{err}; {_FOLDER_HINT}") from None


def load_frames(path: str | Path, image_spec: ImageSpec, video_spec: VideoSpec, expected: int) -> torch.Tensor:
    """Decode and preprocess one video into ``FloatTensor [F, 3, S, S]``, ``F == expected`` (the scan's count).

    Raises:
        VideoError: unreadable, or its frame count changed since the scan (rebuild the index).
    """
    frames = load_video(path, video_spec).frames
    if len(frames) != expected:
        raise VideoError(
            f"video {str(path)!r} now samples {len(frames)} frames but the dataset scan found {expected}: the file "
            "changed after the scan; delete the data index folder (data.index_dir, or <run_dir>/.index) to rescan"
        )
    return process_frames(frames, image_spec, video_spec)
