"""`llavakit webui` in a real headless Chromium, against a real llavakit server on the tiny test checkpoint (the
``server`` and ``client`` fixtures of tests/serving/conftest.py).

The oracle for every answer the page shows is the server itself, asked the same conversation through the ``openai``
client with the page's default settings (temperature 0, top-p 1: greedy, so the same request gets the same tokens).
A MutationObserver in the page logs each change of the last answer and of the textbox's lock, which shows the
answer streaming in and tells when it is complete.

The browser is Debian's ``chromium`` with its ``chromium-driver``; they are installed with apt-get when missing.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
from pathlib import Path

import openai
import pytest
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from llavakit.serving.webui import example_inputs, launch

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MAX_TOKENS = 8
GREEDY = {"temperature": 0.0, "top_p": 1.0, "max_tokens": MAX_TOKENS}
TIMEOUT_S = 60

# Logs, on every DOM change: the last answer's text (null before the first) and how many times the textbox was
# unlocked after being locked (one per finished answer).
OBSERVER = """
window.llavakitLog = {texts: [], finished: 0, locked: false};
new MutationObserver(() => {
  const log = window.llavakitLog;
  const answers = document.querySelectorAll('#chatbot [data-testid="bot"]');
  const text = answers.length ? answers[answers.length - 1].textContent : null;
  if (text !== log.texts[log.texts.length - 1]) log.texts.push(text);
  const locked = document.querySelector('#question textarea').disabled;
  if (log.locked && !locked) log.finished += 1;
  log.locked = locked;
}).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def ensure_chromium() -> None:
    """Install Debian's chromium and chromium-driver when either is missing (as root, or through sudo)."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "-n", "apt-get"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["update"], ["install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]):
        done = subprocess.run([*apt, *args], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(apt + args)} failed ({done.returncode}): {done.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def image_part(path: Path) -> dict:
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def server_answer(client: openai.OpenAI, messages: list[dict]) -> str:
    """The answer of the server's first model (the page's default) with the page's default settings."""
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("webui-examples")


@pytest.fixture(scope="module")
def page_url(server, examples_dir):
    app = launch(
        server.base_url, port=free_port(), block=False, max_tokens=MAX_TOKENS, examples_dir=examples_dir
    )
    yield app.local_url
    app.close()


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "red-circle.png"
    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 50, 50), fill="red")
    image.save(path)
    return path


class ChatPage:
    """The web UI in the browser, freshly loaded, with `OBSERVER` installed."""

    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver = driver
        driver.get(url)
        self.wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#question textarea"), "the page to load")
        driver.execute_script(OBSERVER)

    def wait(self, condition, what: str):
        # Gradio re-renders the chat while it streams or clears: an element found a moment ago may be gone when read,
        # which only means "look again".
        return WebDriverWait(
            self.driver, TIMEOUT_S, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
        ).until(lambda _: condition(), message=f"timed out waiting for {what}")

    def log(self) -> dict:
        return self.driver.execute_script("return window.llavakitLog")

    def attach(self, path: Path) -> None:
        """Choose ``path`` in the textbox's file input and wait for its thumbnail (the upload is done)."""
        before = len(self.driver.find_elements(By.CSS_SELECTOR, "#question .thumbnail-item"))
        upload = self.driver.find_element(By.CSS_SELECTOR, "#question input[type=file]")
        # ChromeDriver adds to a multiple-file input's earlier choice instead of replacing it.
        self.driver.execute_script("arguments[0].value = ''", upload)
        upload.send_keys(str(path))
        self.wait(
            lambda: len(self.driver.find_elements(By.CSS_SELECTOR, "#question .thumbnail-item")) > before,
            f"the thumbnail of {path.name}",
        )

    def paste(self, path: Path) -> None:
        """Paste ``path`` into the textbox as a PNG file from the clipboard; wait for its thumbnail."""
        script = """
        const [name, encoded] = arguments;
        const transfer = new DataTransfer();
        const bytes = Uint8Array.from(atob(encoded), c => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        const paste = new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true, cancelable: true});
        document.querySelector('#question textarea').dispatchEvent(paste);
        """
        self.driver.execute_script(script, path.name, base64.b64encode(path.read_bytes()).decode("ascii"))
        self.wait(
            lambda: self.driver.find_elements(By.CSS_SELECTOR, "#question .thumbnail-item"), "the pasted file"
        )

    def ask(self, question: str) -> str:
        """Type ``question``, press Enter and return the answer once the textbox unlocks."""
        finished = self.log()["finished"]
        self.driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question, Keys.ENTER)
        return self.wait_answer(finished)

    def click(self, element_id: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f"#{element_id}").click()

    def wait_answer(self, finished_before: int) -> str:
        self.wait(lambda: self.log()["finished"] > finished_before, "the answer to finish")
        return self.answers()[-1]

    def answers(self) -> list[str]:
        found = self.driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
        return [element.get_attribute("textContent").strip() for element in found]


def test_image_question_streams_the_servers_answer_and_keeps_the_image_in_the_history(
    browser, page_url, client, red_circle, tmp_path
):
    page = ChatPage(browser, page_url)
    page.attach(red_circle)
    first = page.ask("What colour is the circle?")

    turn = [
        {
            "role": "user",
            "content": [image_part(red_circle), {"type": "text", "text": "What colour is the circle?"}],
        }
    ]
    expected = server_answer(client, turn)
    assert expected.strip(), "the tiny model should say something in 8 tokens"
    assert first == expected.strip()
    # Streamed: the page showed shorter beginnings of the answer before the whole of it.
    partial = [text.strip() for text in page.log()["texts"] if text and text.strip() != first]
    assert partial and all(first.startswith(text) for text in partial), page.log()["texts"]

    # A second turn without an image: the server must still get the first turn's image.
    second = page.ask("And what shape is it?")
    follow_up = [
        *turn,
        {"role": "assistant", "content": expected},
        {"role": "user", "content": [{"type": "text", "text": "And what shape is it?"}]},
    ]
    assert second == server_answer(client, follow_up).strip()
    assert page.answers() == [first, second]

    screenshot = tmp_path / "webui.png"
    assert browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        assert shot.format == "PNG" and shot.width >= 800


def test_example_then_regenerate_then_clear(browser, page_url, examples_dir, client):
    page = ChatPage(browser, page_url)
    browser.find_element(By.CSS_SELECTOR, "#examples button").click()
    page.wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#question .thumbnail-item"), "the example's image"
    )
    (example, *_) = example_inputs(examples_dir)
    assert (
        browser.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value") == example["text"]
    )
    answer = page.ask("")  # Enter sends the example as it stands
    turn = [
        {
            "role": "user",
            "content": [image_part(Path(example["files"][0])), {"type": "text", "text": example["text"]}],
        }
    ]
    assert answer == server_answer(client, turn).strip()

    finished = page.log()["finished"]
    page.click("regenerate")
    assert page.wait_answer(finished) == answer  # greedy: the same answer again, in place of the first
    assert page.answers() == [answer]
    assert page.log()["texts"].count(None) >= 2, "regenerate should remove the old answer before the new one"

    page.click("clear")
    page.wait(lambda: not page.answers(), "the chat to clear")
    assert not browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"]')


def test_a_refused_image_shows_the_servers_error_and_the_chat_goes_on(
    browser, page_url, client, red_circle, tmp_path
):
    not_png = tmp_path / "broken.png"
    not_png.write_bytes(b"these bytes are not an image")
    page = ChatPage(browser, page_url)
    page.paste(not_png)
    shown = page.ask("What is this?")
    # The server's own 400 message, in a box titled Error.
    assert shown.startswith("Error") and "400" in shown and "not a PNG/JPEG/WEBP/GIF/BMP image" in shown

    # The failed turn is not sent again: the next question is answered as if it were the first.
    page.attach(red_circle)
    answer = page.ask("What colour is the circle?")
    turn = [
        {
            "role": "user",
            "content": [image_part(red_circle), {"type": "text", "text": "What colour is the circle?"}],
        }
    ]
    assert answer == server_answer(client, turn).strip()
    assert len(page.answers()) == 2
