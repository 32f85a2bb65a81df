"""What a server serves and how it guards itself: `ServeConfig`, built by ``llavakit serve`` from its flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llavakit.errors import ConfigError
from llavakit.inference.feature_cache import DEFAULT_MAX_BYTES

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ModelSpec:
    """One served model: the name clients put in ``model`` and the checkpoint folder (or Hub id) it loads."""

    name: str
    path: str

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=DIR`` or ``DIR`` (the name is then the folder's last part, e.g. ``runs/demo/final`` → ``final``)."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = Path(text.rstrip("/")).name, text
        if not name or not path:
            raise ConfigError(f"--model {text!r}: use NAME=DIR or DIR, e.g. --model demo=runs/demo/final")
        return cls(name, path)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``llavakit serve`` takes.

    Attributes:
        models: the models, by name (at least one; names unique).
        host: interface to bind; loopback unless the operator opens it on purpose.
        port: TCP port (0: any free port, see `llavakit.serving.server.BackgroundServer`).
        api_key: when set, every ``/v1`` request needs ``Authorization: Bearer KEY``.
        allowed_local_media_path: folder whose files ``file://`` URLs and local paths may name (None: none).
        allowed_media_domains: hosts whose URLs may be fetched even if they resolve to private addresses.
        max_images_per_request: images in one request's messages at most.
        max_videos_per_request: videos (``video_url`` parts) in one request's messages at most.
        max_video_bytes: encoded size of one video at most.
        max_video_frames: frames one video is sampled to at most (checked before decoding).
        max_video_source_frames: frames (packets) one video has at most, counted before decoding (decoding walks
            every frame up to the last sampled one).
        max_video_decoded_pixels: frames x width x height of one video at most (the decoding work, from the
            header, before decoding).
        max_video_sampled_pixels: width x height summed over one video's sampled frames at most (the frames kept
            in memory; from the header before decoding, then on the decoded frames).
        video_decode_timeout_s: time to read one video's header, packets and frames at most.
        max_image_bytes: encoded size of one image at most.
        max_image_pixels: width × height of one image at most (checked before decoding).
        max_body_bytes: request body size at most.
        max_batch: rows decoded together at most per model (continuous batching).
        max_n: choices per request (``n``) at most.
        default_max_tokens: answer length when a request sets none (capped by the context left).
        feature_cache_bytes: image-feature cache bound, shared by all models (0 disables it).
        template: chat template id overriding every model's own (None: each checkpoint's).
        system_prompt: system prompt overriding every model's own.
        device: ``cpu`` / ``cuda`` (None: CUDA when available).
        fetch_timeout_s: timeout of one image URL fetch.
    """

    models: tuple[ModelSpec, ...]
    host: str = LOOPBACK
    port: int = 8000
    api_key: str | None = None
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = ()
    max_images_per_request: int = 8
    max_videos_per_request: int = 1
    max_video_bytes: int = 40 * 1024**2
    max_video_frames: int = 64
    max_video_source_frames: int = 18_000  # 10 minutes at 30 fps
    max_video_decoded_pixels: int = 18_000 * 1280 * 720  # 10 minutes of 720p at 30 fps
    max_video_sampled_pixels: int = 64 * 1920 * 1080  # 64 sampled 1080p frames, ~400 MB as RGB
    video_decode_timeout_s: float = 30.0
    max_image_bytes: int = 20 * 1024**2
    max_image_pixels: int = 40_000_000
    max_body_bytes: int = 64 * 1024**2
    max_batch: int = 32
    max_n: int = 8
    default_max_tokens: int = 512
    feature_cache_bytes: int = DEFAULT_MAX_BYTES
    template: str | None = None
    system_prompt: str | None = None
    device: str | None = None
    fetch_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("serve needs at least one --model NAME=DIR")
        names = [spec.name for spec in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(
                f"model names must be unique, {duplicates} repeat: name them with --model NAME=DIR"
            )
        for name in (
            "max_images_per_request",
            "max_videos_per_request",
            "max_image_bytes",
            "max_video_bytes",
            "max_video_frames",
            "max_video_source_frames",
            "max_video_decoded_pixels",
            "max_video_sampled_pixels",
            "max_image_pixels",
            "max_body_bytes",
            "max_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.max_n <= 128:
            raise ConfigError(f"max_n must be in [1, 128], got {self.max_n}")
        if self.feature_cache_bytes < 0 or not self.fetch_timeout_s > 0 or not self.video_decode_timeout_s > 0:
            raise ConfigError(
                f"feature_cache_bytes must be >= 0, fetch_timeout_s and video_decode_timeout_s > 0, got "
                f"{self.feature_cache_bytes}, {self.fetch_timeout_s} and {self.video_decode_timeout_s}"
            )
        if self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
