"""``llavakit serve``: an OpenAI-compatible chat-completions server for one or more checkpoints.

    llavakit serve --model demo=runs/demo/final --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello"}]}'
"""

from __future__ import annotations

import argparse
import os

from llavakit.serving.config import LOOPBACK, ModelSpec, ServeConfig

# The flags' defaults are ServeConfig's own, so the library and the CLI cannot drift apart.
_DEFAULTS = ServeConfig(models=(ModelSpec("_", "_"),))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="Serve checkpoints over an OpenAI-compatible HTTP API (chat completions, streaming, images).",
        description=(
            "Serve one or more checkpoints at /v1/chat/completions (OpenAI's API: image_url parts as data: or "
            "http(s) URLs, streaming, n, seed, stop), /v1/models and /health. Concurrent requests share "
            "generation steps (continuous batching); encoded images are cached. Binds 127.0.0.1 unless --host "
            "says otherwise."
        ),
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="checkpoint folder or Hub id, optionally named (repeat to serve several; clients pick by name)",
    )
    parser.add_argument(
        "--host", default=LOOPBACK, help="interface to bind (default 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLAVAKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 requests (default: $LLAVAKIT_API_KEY, which keeps the key "
        "out of the process list and shell history)",
    )
    parser.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="allow file:// URLs and local paths for images, inside DIR only (default: no local files)",
    )
    parser.add_argument(
        "--allowed-media-domains",
        nargs="*",
        default=[],
        metavar="HOST",
        help="hosts whose image URLs may be fetched even if they resolve to private or loopback addresses",
    )
    parser.add_argument(
        "--max-images-per-request",
        type=int,
        default=_DEFAULTS.max_images_per_request,
        help="images per request at most (%(default)s)",
    )
    parser.add_argument(
        "--max-videos-per-request",
        type=int,
        default=_DEFAULTS.max_videos_per_request,
        help="videos (video_url parts) per request at most (%(default)s)",
    )
    parser.add_argument(
        "--max-video-bytes",
        type=int,
        default=_DEFAULTS.max_video_bytes,
        help="encoded bytes per video at most (%(default)s; a data: URL also counts against --max-body-bytes)",
    )
    parser.add_argument(
        "--max-video-frames",
        type=int,
        default=_DEFAULTS.max_video_frames,
        help="frames one video may be sampled to at most, counted before decoding (%(default)s)",
    )
    parser.add_argument(
        "--max-video-source-frames",
        type=int,
        default=_DEFAULTS.max_video_source_frames,
        help="frames a video may have at most, counted from its packets before decoding, since decoding walks "
        "them all (%(default)s: 10 minutes at 30 fps)",
    )
    parser.add_argument(
        "--max-video-decoded-pixels",
        type=int,
        default=_DEFAULTS.max_video_decoded_pixels,
        help="frames x width x height of a video at most, checked before decoding (%(default)s: 10 minutes of "
        "720p at 30 fps)",
    )
    parser.add_argument(
        "--max-video-sampled-pixels",
        type=int,
        default=_DEFAULTS.max_video_sampled_pixels,
        help="width x height summed over a video's sampled frames, the frames held in memory, at most "
        "(%(default)s: 64 frames of 1080p)",
    )
    parser.add_argument(
        "--video-decode-timeout",
        type=float,
        default=_DEFAULTS.video_decode_timeout_s,
        metavar="SECONDS",
        help="time to read and decode one video at most (%(default)s)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=_DEFAULTS.max_batch,
        help="requests decoded together per model at most (%(default)s)",
    )
    parser.add_argument(
        "--max-image-bytes",
        type=int,
        default=_DEFAULTS.max_image_bytes,
        help="encoded bytes per image at most (%(default)s)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=_DEFAULTS.max_image_pixels,
        help="width x height per image at most (%(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=_DEFAULTS.max_body_bytes,
        help="request body size at most (%(default)s)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=_DEFAULTS.default_max_tokens,
        help="answer length when a request sets none (%(default)s)",
    )
    parser.add_argument(
        "--feature-cache-mb",
        type=int,
        default=_DEFAULTS.feature_cache_bytes // 1024**2,
        help="memory for cached image features, shared by all models (0 turns the cache off; default %(default)s)",
    )
    parser.add_argument("--template", default=None, help="chat template id overriding every checkpoint's own")
    parser.add_argument(
        "--system-prompt", default=None, help="system prompt overriding every checkpoint's own"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The `ServeConfig` the flags describe."""
    return ServeConfig(
        models=tuple(ModelSpec.parse(text) for text in args.model),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=tuple(args.allowed_media_domains),
        max_images_per_request=args.max_images_per_request,
        max_videos_per_request=args.max_videos_per_request,
        max_image_bytes=args.max_image_bytes,
        max_video_bytes=args.max_video_bytes,
        max_video_frames=args.max_video_frames,
        max_video_source_frames=args.max_video_source_frames,
        max_video_decoded_pixels=args.max_video_decoded_pixels,
        max_video_sampled_pixels=args.max_video_sampled_pixels,
        video_decode_timeout_s=args.video_decode_timeout,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=args.max_body_bytes,
        max_batch=args.max_batch,
        default_max_tokens=args.default_max_tokens,
        feature_cache_bytes=args.feature_cache_mb * 1024**2,
        template=args.template,
        system_prompt=args.system_prompt,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    from llavakit.serving.server import serve

    serve(config_from_args(args), log_level=args.log_level)
    return 0
