"""``llavakit webui``'s command line: the help, the choice of backend, and ``--model`` serving a checkpoint in the
same process behind the page (a real `llavakit webui` process, stopped with Ctrl-C)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llavakit.cli.main import main


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["webui", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for flag in (
        "--server URL",
        "--model [NAME=]DIR",
        "--api-key",
        "--host",
        "--port",
        "--share",
        "127.0.0.1",
    ):
        assert flag in shown


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["webui"], "one of the arguments --server --model is required"),
        (["webui", "--server", "http://127.0.0.1:8000/v1", "--model", "ckpt"], "not allowed with"),
    ],
)
def test_exactly_one_backend(argv, complaint, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


@pytest.mark.slow
def test_model_serves_the_checkpoint_behind_the_page(checkpoint, tmp_path):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llavakit.cli.main",
        "webui",
        "--model",
        f"tiny={checkpoint}",
        "--port",
        str(port),
    ]
    log = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        # The command prints where its in-process server listens, then starts the page.
        line = process.stdout.readline()
        assert line.startswith("llavakit webui: serving tiny at http://127.0.0.1:"), (
            tmp_path / "stderr.txt"
        ).read_text()
        base_url = line.split(" at ")[1].strip()
        config = page_config(f"http://127.0.0.1:{port}", process)
        dropdowns = [c["props"]["choices"] for c in config["components"] if c.get("type") == "dropdown"]
        assert dropdowns == [[["tiny", "tiny"]]]
        # The page's backend is a real server: it answers an OpenAI request for the model.
        reply = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0
        )
        assert reply.choices[0].message.content
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "stderr.txt").read_text()


def page_config(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> dict:
    """Gradio's ``/config`` of the page at ``url`` once it answers (fails if the command exits first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"llavakit webui exited with {process.returncode}"
        try:
            return httpx.get(f"{url}/config", timeout=5).raise_for_status().json()
        except httpx.HTTPError:
            time.sleep(0.2)
    pytest.fail(f"the page at {url} did not answer within {timeout_s} s")
