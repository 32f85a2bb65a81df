"""``llavakit chat --model PATH [--image IMG] [--video VIDEO]``: talk to a checkpoint about images and videos.

Reads questions from stdin (interactive or piped); ``/image PATH``, ``/video PATH``, ``/reset`` and ``/quit``
control the session. ``--video`` needs a checkpoint built with video; it is read with the checkpoint's video spec.
The work happens in `llavakit.inference.chat`; this module parses arguments and loads the model.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``chat`` command."""
    parser = subparsers.add_parser(
        "chat",
        help="Chat with a trained model about images (multi-turn, interactive or piped).",
        description=(
            "Load a checkpoint (llavakit or llava-hf layout) and answer questions read from stdin. Commands: "
            "/image PATH (use an image, start a new conversation), /video PATH (use a video, start a new "
            "conversation), /reset, /quit. Bad input (missing file, not an image or video, empty question) prints a "
            "message and the chat goes on."
        ),
    )
    parser.add_argument("--model", required=True, help="checkpoint folder, e.g. runs/demo/final")
    parser.add_argument("--image", help="image for the first question")
    parser.add_argument(
        "--video", help="video file or frame folder for the first question (checkpoints built with video)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="answer length cap in tokens (default 64)"
    )
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (with --sample)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument(
        "--template",
        default=None,
        metavar="ID",
        help="chat template id overriding the checkpoint's (e.g. vicuna_v1, processor); default: the checkpoint's",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        metavar="TEXT",
        help="system prompt overriding the checkpoint's; default: the checkpoint's",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model and run the chat over stdin."""
    from pathlib import Path

    from llavakit.anyres.pixels import load_image
    from llavakit.errors import VideoError
    from llavakit.inference.api import load
    from llavakit.inference.chat import interactive_lines, run_chat
    from llavakit.inference.videos import read_video

    if args.image is not None:
        load_image(args.image)  # a bad --image stops here (exit 1), not after an answer given without it
    if args.video is not None and not Path(args.video).exists():
        raise VideoError(f"--video {args.video!r} does not exist: pass a video file or a folder of frames")

    assistant = load(
        args.model,
        device=args.device,
        template=args.template,
        system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    # Read here, with the checkpoint's video spec: a bad --video (or a model without video) stops before the chat.
    video = None if args.video is None else read_video(args.video, assistant.model.config.video_spec)
    return run_chat(
        assistant, interactive_lines(sys.stdin, sys.stdout), sys.stdout, image=args.image, video=video
    )
