"""The chat REPL: bad input prints a clear message and the chat goes on (in process and through piped stdin)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import llavakit
from llavakit.inference.chat import ChatSession, run_chat


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return llavakit.load(checkpoint, device="cpu", max_new_tokens=4)


def _script(tmp_path, image: str) -> list[str]:
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not pixels")
    return [
        f"/image {tmp_path / 'missing.png'}\n",
        f"/image {not_an_image}\n",
        "   \n",
        "/frobnicate\n",
        f"/image {image}\n",
        "What colour is the circle?\n",
        "And the square?\n",
        "/reset\n",
        "Which shape is round?\n",
        "/quit\n",
        "never read\n",
    ]


def test_bad_input_is_reported_and_the_chat_goes_on(assistant, images, tmp_path):
    output = io.StringIO()
    assert run_chat(assistant, _script(tmp_path, images[0]), output) == 0
    lines = output.getvalue().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 4
    assert "does not exist" in errors[0] and "not a readable image" in errors[1]
    assert "empty" in errors[2] and "unknown command" in errors[3]
    assert sum(line.startswith("assistant> ") for line in lines) == 3


def test_history_spans_turns_until_reset(assistant, images):
    session = ChatSession(assistant, io.StringIO(), image=images[0])
    session.handle("What colour is the circle?")
    session.handle("And the square?")
    assert len(session.state.history.turns) == 4 and session.state.history.images == (images[0],)
    session.handle("/reset")
    assert session.state.history is None and session.state.pending_image is None


def test_cli_chat_with_piped_stdin(checkpoint, images, tmp_path):
    script = "".join(_script(tmp_path, images[0]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "llavakit.cli.main", "chat", "--model", str(checkpoint), "--max-new-tokens", "3"],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("error:") == 4
    assert done.stdout.count("assistant> ") == 3


def test_a_prompt_longer_than_the_context_is_refused_and_the_chat_goes_on(assistant, images):
    output = io.StringIO()
    session = ChatSession(assistant, output, image=images[0])
    session.ask("word " * assistant.context_length)
    assert "context is 4096 tokens" in output.getvalue() and "assistant> " not in output.getvalue()
    session.ask("What colour?")
    assert output.getvalue().count("assistant> ") == 1


def test_cli_chat_with_a_missing_image_stops_before_answering(checkpoint, tmp_path, capsys):
    from llavakit.cli.main import main

    missing = tmp_path / "missing.png"
    code = main(["chat", "--model", str(checkpoint), "--image", str(missing)])
    captured = capsys.readouterr()
    assert code == 2 and str(missing) in captured.err and "assistant>" not in captured.out
