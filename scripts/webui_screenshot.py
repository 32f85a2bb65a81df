"""Take the README's screenshot of ``llavakit webui`` (docs/images/webui.png) in headless Chromium.

    .venv/bin/llavakit demo                                   # trains runs/demo/final (minutes on a CPU)
    .venv/bin/python scripts/webui_screenshot.py --model runs/demo/final

Starts a llavakit server on the checkpoint and the web UI (both on free loopback ports), opens the page in Debian's
``chromium`` through ``chromedriver`` (Selenium), clicks the first example (the red circle: "What colour is the
shape?"), asks a follow-up question, and saves the page once both answers are in.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from llavakit.serving.config import ModelSpec, ServeConfig
from llavakit.serving.server import BackgroundServer
from llavakit.serving.webui import launch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def open_browser(width: int, height: int) -> WebDriver:
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def send_and_wait(driver: WebDriver, text: str, answers: int) -> None:
    """Type ``text`` and Enter; wait until the page shows ``answers`` answers and the textbox is unlocked."""
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(text, Keys.ENTER)

    def done(_: WebDriver) -> bool:
        shown = driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
        return (
            len(shown) == answers and driver.find_element(By.CSS_SELECTOR, "#question textarea").is_enabled()
        )

    WebDriverWait(driver, 120, poll_frequency=0.1).until(done, message=f"no answer {answers} after 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder, e.g. runs/demo/final")
    parser.add_argument("--name", default="demo", help="model name shown in the page (default demo)")
    parser.add_argument(
        "--follow-up", default="What shape is it?", help="second question (default: its shape)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("docs/images/webui.png"), help="where to save the PNG"
    )
    parser.add_argument("--size", default="1280x820", help="browser window WIDTHxHEIGHT (default 1280x820)")
    args = parser.parse_args()

    width, height = (int(n) for n in args.size.split("x"))
    config = ServeConfig(models=(ModelSpec(args.name, args.model),), host="127.0.0.1", port=0)
    with BackgroundServer(config) as server, tempfile.TemporaryDirectory() as examples:
        app = launch(server.base_url, port=free_port(), block=False, examples_dir=Path(examples))
        driver = open_browser(width, height)
        try:
            driver.get(app.local_url)
            wait = WebDriverWait(driver, 60, poll_frequency=0.1)
            wait.until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button"), message="page not loaded"
            )
            driver.find_element(By.CSS_SELECTOR, "#examples button").click()
            wait.until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#question .thumbnail-item"), message="no example"
            )
            send_and_wait(driver, "", answers=1)
            send_and_wait(driver, args.follow_up, answers=2)
            # The chat scrolls to its end; show it from the top, where the image is.
            driver.execute_script("document.querySelector('#chatbot .bubble-wrap').scrollTo(0, 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
            app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
