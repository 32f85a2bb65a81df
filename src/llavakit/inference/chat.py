"""The interactive chat behind ``llavakit chat`` and ``llavakit demo --chat``: a line-based REPL over `Assistant.chat`.

Commands (anything else is a question about the current image or video)::

    /image PATH   use this image from the next question on (starts a new conversation)
    /video PATH   use this video (file or frame folder) from the next question on (starts a new conversation;
                  models built with video only); it is decoded once, here
    /reset        forget the conversation, the image and the video
    /quit         leave (end of input does the same)

Bad input never ends the session: a missing file, a file that is not an image (video), a video for a model without
video, or an empty question prints what is wrong and how to fix it, and the prompt comes back. The session reads
from any text stream, so it is tested with piped stdin.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TextIO

from llavakit.anyres.pixels import load_image
from llavakit.anyres.video import Video
from llavakit.errors import LlavakitError
from llavakit.inference.api import Assistant, ChatHistory
from llavakit.inference.videos import VideoInput, read_video

HELP = (
    "commands: /image PATH (new image, new conversation), /video PATH (new video, new conversation), /reset, "
    "/quit; anything else is a question"
)
PROMPT = "you> "


@dataclass
class ChatState:
    """The image and video waiting to be sent with the next question, and the conversation so far."""

    pending_image: str | None = None
    history: ChatHistory | None = None
    pending_video: Video | None = None


class ChatSession:
    """One chat with an `Assistant`.

    Args:
        assistant: the loaded model.
        output: where answers and messages are written.
        image: an image for the first question (e.g. ``--image``); checked like ``/image``.
        video: a video for the first question (e.g. ``--video``; a path or a loaded `Video`), sent with the image
            when both are given; read like ``/video``.
    """

    def __init__(
        self,
        assistant: Assistant,
        output: TextIO,
        image: str | None = None,
        video: VideoInput | None = None,
    ) -> None:
        self.assistant = assistant
        self.output = output
        self.state = ChatState()
        if image is not None:
            self.set_image(image)
        if video is not None:
            self.set_video(video, keep_image=True)

    def say(self, text: str) -> None:
        """Write one line to the output."""
        print(text, file=self.output, flush=True)

    def set_image(self, path: str) -> bool:
        """Check ``path`` is a usable image and start a new conversation about it; False (and a message) if not."""
        if not path:
            self.say("error: /image needs a path, e.g. /image runs/demo/data/images/heldout/00000.png")
            return False
        try:
            load_image(path)
        except LlavakitError as err:
            self.say(f"error: {err}")
            return False
        self.state = ChatState(pending_image=path)
        self.say(f"[image: {path}; new conversation]")
        return True

    def set_video(self, source: VideoInput, keep_image: bool = False) -> bool:
        """Read the video at ``source`` with the model's video spec and start a new conversation about it (with
        the pending image too when ``keep_image``); False (and a message) if it is unusable."""
        if not source:
            self.say("error: /video needs a path, e.g. /video clips/ball.mp4 (a video file or a frame folder)")
            return False
        try:
            video = read_video(source, self.assistant.model.config.video_spec)
        except LlavakitError as err:
            self.say(f"error: {err}")
            return False
        image = self.state.pending_image if keep_image else None
        self.state = ChatState(pending_image=image, pending_video=video)
        name = source if isinstance(source, str) else "given"
        self.say(f"[video: {name}, {len(video.frames)} frames; new conversation]")
        return True

    def handle(self, line: str) -> bool:
        """Process one input line; returns False when the session should end."""
        text = line.strip()
        command, _, argument = text.partition(" ")
        if command == "/quit":
            return False
        if command == "/reset":
            self.state = ChatState()
            self.say("[conversation, image and video cleared]")
        elif command == "/image":
            self.set_image(argument.strip())
        elif command == "/video":
            self.set_video(argument.strip())
        elif command.startswith("/"):
            self.say(f"error: unknown command {command!r}; {HELP}")
        elif not text:
            self.say("error: the question is empty; type a question, or /quit")
        else:
            self.ask(text)
        return True

    def ask(self, question: str) -> None:
        """Send ``question`` (with the pending image and video, if any) and print the answer."""
        try:
            answer, history = self.assistant.chat(
                self.state.pending_image, question, history=self.state.history, video=self.state.pending_video
            )
        except LlavakitError as err:
            self.say(f"error: {err}")
            return
        self.state = ChatState(pending_image=None, history=history)
        self.say(f"assistant> {answer}")


def run_chat(
    assistant: Assistant,
    lines: Iterable[str],
    output: TextIO,
    image: str | None = None,
    video: VideoInput | None = None,
) -> int:
    """Run a `ChatSession` over input ``lines`` until ``/quit`` or end of input; returns exit code 0."""
    session = ChatSession(assistant, output, image, video)
    session.say(HELP)
    for line in lines:
        if not session.handle(line):
            break
    return 0


def interactive_lines(stream: TextIO, output: TextIO) -> Iterator[str]:
    """Lines of ``stream``, writing `PROMPT` to ``output`` before each when a person is typing (a TTY)."""
    while True:
        if stream.isatty():
            print(PROMPT, end="", file=output, flush=True)
        line = stream.readline()
        if not line:
            return
        yield line
