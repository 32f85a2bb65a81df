"""``llavakit webui (--server URL | --model [NAME=]DIR ...)``: a browser chat page for images and questions.

    llavakit webui --model demo=runs/demo/final                 # then open http://127.0.0.1:7860
    llavakit webui --server http://127.0.0.1:8000/v1            # in front of a running 'llavakit serve'

The page (`llavakit.serving.webui`) talks to an OpenAI-compatible llavakit server: an existing one (``--server``),
or one this command starts in its own process on a free loopback port (``--model``, repeatable), so there is one
code path either way. This module parses arguments and starts things.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``webui`` command."""
    parser = subparsers.add_parser(
        "webui",
        help="Chat with a model about images in the browser (Gradio page in front of 'llavakit serve').",
        description=(
            "Serve a chat page: upload, drop or paste images, ask questions over several turns and watch the answer "
            "stream in; pick the model, temperature, top-p and answer length; regenerate or clear; try the example "
            "images. The page talks to a running 'llavakit serve' (--server URL) or starts one in this process on "
            "a free 127.0.0.1 port (--model, repeatable). Answers are greedy (temperature 0) until you change it. "
            "The page listens on 127.0.0.1 only unless --host says otherwise: it has no login of its own."
        ),
    )
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument(
        "--server",
        metavar="URL",
        help="OpenAI-compatible API root of a running server, e.g. http://127.0.0.1:8000/v1",
    )
    backend.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]DIR",
        help="checkpoint folder to serve in this process, optionally named (e.g. tiny=runs/demo/final); repeat "
        "for several models, picked in the page",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="the key of the --server, if it has one; with --model, the server started here requires it too",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the page listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also publish the page through a public gradio.live link (off by default)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Start the in-process server if asked, then serve the page until Ctrl-C."""
    from llavakit.serving.webui import launch

    page = {"host": args.host, "port": args.port, "share": args.share}
    if args.server is not None:
        launch(args.server, args.api_key, **page)
        return 0
    from llavakit.serving.config import ModelSpec, ServeConfig
    from llavakit.serving.server import BackgroundServer

    models = tuple(ModelSpec.parse(spec) for spec in args.model)
    config = ServeConfig(models=models, host="127.0.0.1", port=0, api_key=args.api_key)
    with BackgroundServer(config) as server:
        print(f"llavakit webui: serving {', '.join(m.name for m in models)} at {server.base_url}", flush=True)
        launch(server.base_url, args.api_key, **page)
    return 0
