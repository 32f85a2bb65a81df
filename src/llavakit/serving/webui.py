"""``llavakit webui``: a Gradio chat page in front of a llavakit server (or any OpenAI-compatible one).

The page is only a client of the OpenAI-compatible API (``/v1/models``, ``/v1/chat/completions`` with
``stream=True``), through the ``openai`` package: one code path whether the server runs elsewhere (``--server``) or
in this process (``--model``, see `llavakit.cli.webui`). Each request sends the whole conversation, earlier images
included, as OpenAI content parts (images as ``data:`` URLs), so the server holds no chat state.

Gradio's Chatbot hands the history to event handlers as messages whose ``content`` is a list of parts:
``{"type": "text", "text"}`` and ``{"type": "file", "file": {"path", ...}}`` (uploads saved by Gradio). Server and
image errors become an assistant message titled "Error" (a Gradio "thought" box): visible in the chat; the turn
that failed is not sent again, so the chat goes on (Regenerate retries it).
The defaults (temperature 0, top-p 1) ask for greedy decoding, so the same question gets the same answer.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import openai

from llavakit.errors import ConfigError, ImageError, LlavakitError

# Gradio Chatbot history: a list of {"role", "content": [part, ...], "metadata"?} dicts.
History = list[dict[str, Any]]

ERROR_TITLE = "Error"
# Notes shown in the chat that are not the model's words: Gradio shows a message with a metadata title as a box.
NOTE_TITLES = (ERROR_TITLE, "Empty answer")
DEFAULT_MAX_TOKENS = 512
# The openai client needs some key; a llavakit server started without --api-key accepts any.
NO_API_KEY = "no-key"
EXAMPLES_DIR = Path(tempfile.gettempdir()) / "llavakit-webui-examples"


def build_app(
    base_url: str,
    api_key: str | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    examples_dir: Path = EXAMPLES_DIR,
) -> gr.Blocks:
    """Build the chat page for the server at ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``).

    Args:
        base_url: the OpenAI-compatible API root, ending in ``/v1``.
        api_key: the server's key (``llavakit serve --api-key``); None for a server without one.
        max_tokens, temperature, top_p: the sliders' starting values (the defaults decode greedily).
        examples_dir: where the example images are drawn (once).

    Raises:
        ConfigError: the server cannot be reached or serves no model.
    """
    # No retries: in a chat a failed request should show its error at once, not after backoff.
    client = openai.OpenAI(base_url=base_url, api_key=api_key or NO_API_KEY, max_retries=0)
    models = list_models(client, base_url)

    def answer(history: History, model: str, temp: float, nucleus: float, limit: float) -> Iterator[History]:
        sampling = {"temperature": temp, "top_p": nucleus, "max_tokens": int(limit)}
        yield from stream_answer(client, model, history, sampling)

    with gr.Blocks(title="llavakit", analytics_enabled=False) as app:
        gr.Markdown(
            f"## llavakit chat\nServer: `{base_url}`. Drop, paste or upload images, then ask about them."
        )
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Chat", elem_id="chatbot", height=440, buttons=["copy", "copy_all"]
                )
                textbox = gr.MultimodalTextbox(
                    elem_id="question",
                    file_types=["image"],
                    file_count="multiple",
                    placeholder="Ask about an image (drop, paste or upload it first)",
                    show_label=False,
                )
                with gr.Row():
                    regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm")
                    clear = gr.Button("Clear", elem_id="clear", size="sm")
            with gr.Column(scale=1):
                model = gr.Dropdown(models, value=models[0], label="Model", elem_id="model")
                temp = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature (0: greedy)")
                nucleus = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top-p")
                limit = gr.Slider(
                    1, 4096, value=max_tokens, step=1, label="Max new tokens", elem_id="max-tokens"
                )
                gr.Examples(
                    examples=example_inputs(examples_dir),
                    inputs=textbox,
                    label="Examples",
                    elem_id="examples",
                )
        settings = [model, temp, nucleus, limit]

        asked = textbox.submit(add_question, [chatbot, textbox], [chatbot, textbox], queue=False)
        retried = [
            trigger(drop_answer, chatbot, chatbot, queue=False).then(busy, None, textbox, queue=False)
            for trigger in (regenerate.click, chatbot.retry)
        ]
        running = [start.then(answer, [chatbot, *settings], chatbot) for start in (asked, *retried)]
        for event in running:
            event.then(ready, None, textbox, queue=False)
        textbox.stop(ready, None, textbox, cancels=running, queue=False)
        for trigger in (clear.click, chatbot.clear):
            trigger(lambda: ([], ready()), None, [chatbot, textbox], cancels=running, queue=False)
    return app


def launch(
    base_url: str,
    api_key: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
    **options: Any,
) -> gr.Blocks:
    """Build the page (`build_app` with ``options``) and serve it on ``host:port``.

    With ``block`` the call returns when the server stops (Ctrl-C); without, it returns at once and the caller
    stops the page with ``app.close()``. Its address is ``app.local_url``.
    """
    app = build_app(base_url, api_key, **options)
    # No limit on concurrent answers: the server batches requests, the page should not serialise its users.
    app.queue(default_concurrency_limit=None).launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block
    )
    return app


def list_models(client: openai.OpenAI, base_url: str) -> list[str]:
    """The ids of the models the server answers for, in its order.

    Raises:
        ConfigError: the server is unreachable, refuses the key, or serves no model.
    """
    try:
        models = [entry.id for entry in client.models.list()]
    except openai.APIError as err:
        raise ConfigError(
            f"cannot list the models of the server at {base_url} ({err}); give its API root, ending in /v1, start "
            "one with 'llavakit serve --model DIR' (or run 'llavakit webui --model DIR'), and pass its --api-key if "
            "it has one"
        ) from err
    if not models:
        raise ConfigError(f"the server at {base_url} serves no model; start it with --model DIR")
    return models


def add_question(history: History, message: dict[str, Any] | None) -> tuple[History, gr.MultimodalTextbox]:
    """Append the textbox's images and text as one user message; lock the textbox while the answer streams.

    ``message`` is the MultimodalTextbox value: ``{"text": str, "files": [path, ...]}``.
    """
    message = message or {}
    text = message.get("text", "").strip()
    if not text:
        raise gr.Error("Type a question (images alone are not a question).")
    # {"path"} parts: Gradio reads their type from the name and shows images inline.
    parts = [{"path": path} for path in message.get("files", [])]
    history = [*history, {"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return history, busy(empty=True)


def busy(empty: bool = False) -> gr.MultimodalTextbox:
    """The textbox while an answer streams: locked, with a stop button instead of submit; emptied if ``empty``
    (its question was just sent), else kept (a regenerate leaves what the user is typing alone)."""
    # Gradio updates only the arguments passed, so value=None must be passed only to empty it.
    content = {"value": None} if empty else {}
    return gr.MultimodalTextbox(**content, interactive=False, submit_btn=False, stop_btn=True)


def ready() -> gr.MultimodalTextbox:
    """The textbox waiting for a question (its text and images kept)."""
    return gr.MultimodalTextbox(interactive=True, submit_btn=True, stop_btn=False)


def drop_answer(history: History) -> History:
    """The history without what followed its last user message (the answer, or error, to regenerate)."""
    users = [i for i, message in enumerate(history) if message["role"] == "user"]
    if not users:
        raise gr.Error("Nothing to regenerate: ask a question first.")
    return history[: users[-1] + 1]


def stream_answer(
    client: openai.OpenAI, model: str, history: History, sampling: dict[str, Any]
) -> Iterator[History]:
    """Ask ``model`` to answer ``history`` (ending with a user message); yield the history with the answer so far.

    An API or image error ends the answer with an error message in the chat instead of raising.
    """
    text = ""
    try:
        with client.chat.completions.create(
            model=model, messages=to_openai_messages(history), stream=True, **sampling
        ) as stream:
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    text += delta
                    yield [*history, assistant_message(text)]
    except (openai.APIError, LlavakitError) as err:
        yield [*history, *([assistant_message(text)] if text else []), note(ERROR_TITLE, str(err))]
        return
    if not text:
        yield [*history, note("Empty answer", "The model ended its answer before writing any text.")]


def to_openai_messages(history: History) -> list[dict[str, Any]]:
    """Gradio chat messages → OpenAI chat messages (images as ``data:`` URLs, before the text of their turn).

    A turn (a user message and what followed it) that ended in a note (an error) is left out: a refused image
    would otherwise make every later request fail too. A user message without an answer (stopped before its first
    token) merges into the next one, so roles alternate.
    """
    turns: list[History] = []
    for message in history:
        if message["role"] == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    messages: list[dict[str, Any]] = []
    for message in (m for turn in turns if not any(map(is_note, turn)) for m in turn):
        if message["role"] == "user":
            content = [openai_part(part) for part in message["content"]]
        else:
            content = "".join(part["text"] for part in message["content"] if part.get("type") == "text")
        if messages and messages[-1]["role"] == "user" == message["role"]:
            messages[-1]["content"] += content
        else:
            messages.append({"role": message["role"], "content": content})
    return messages


def is_note(message: dict[str, Any]) -> bool:
    """Whether ``message`` is a note of this page (an error, an empty answer) rather than the model's words."""
    return (message.get("metadata") or {}).get("title") in NOTE_TITLES


def openai_part(part: dict[str, Any]) -> dict[str, Any]:
    """One Gradio content part of a user message → an OpenAI content part."""
    if part.get("type") == "text":
        return {"type": "text", "text": part["text"]}
    return {"type": "image_url", "image_url": {"url": data_url(Path(part["file"]["path"]))}}


def data_url(path: Path) -> str:
    """``data:image/...;base64,...`` of the image file at ``path`` (its bytes unchanged).

    Raises:
        ImageError: the file is not named as an image or cannot be read.
    """
    mime, _ = mimetypes.guess_type(path.name)
    if mime is None or not mime.startswith("image/"):
        raise ImageError(f"{path.name} is not an image file (type {mime}); upload a PNG, JPEG, WebP or GIF")
    try:
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as err:
        raise ImageError(f"cannot read the uploaded image {path}: {err}; upload it again") from err
    return f"data:{mime};base64,{encoded}"


def assistant_message(text: str) -> dict[str, Any]:
    """An assistant message showing ``text`` as written (a typed part: Gradio would dedent a bare string)."""
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def note(title: str, text: str) -> dict[str, Any]:
    """A message shown in a titled box, not the model's words (left out of what is sent to the server)."""
    return {**assistant_message(text), "metadata": {"title": title}}


def example_inputs(folder: Path) -> list[dict[str, Any]]:
    """Two example questions with images drawn like the demo's synthetic data (so the demo model answers them).

    The images are drawn at run time, once per folder, rather than shipped as binary files.
    """
    from llavakit.data.synth import Scene, Shape, render_scene

    scenes = {
        "red-circle.png": (
            "What colour is the shape?",
            Scene(64, 64, (Shape("circle", "red", 0, 0, 24),), None, None, ((0, 0),)),
        ),
        "blue-square-word.png": (
            "What word is written?",
            Scene(64, 128, (Shape("square", "blue", 0, 0, 24),), "cat", (1, 2), ((0, 0), (0, 0))),
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for name, (question, scene) in scenes.items():
        path = folder / name
        if not path.exists():
            # Written aside then renamed: another page starting at the same time never reads half a file.
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.png")
            render_scene(scene).save(partial)
            partial.replace(path)
        examples.append({"text": question, "files": [str(path)]})
    return examples
