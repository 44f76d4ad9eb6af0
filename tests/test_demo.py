"""The web demo (``python -m pipeline.demo``) served in a subprocess, driven by headless Chromium and by gradio_client."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
STARTUP_S = 240  # a loaded 2-core machine takes long to import gradio, torch and diffusers
GENERATE_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo of the tiny run's export on a free localhost port; stopped after the module."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = os.environ | {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline.demo", "--pipeline", str(tiny_run / "pipeline"), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_S
        while url.rstrip("/") not in log.read_text():
            assert server.poll() is None, f"the demo exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the demo did not start in {STARTUP_S} s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_bad_command_line_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.demo", "--pipeline", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no exported pipeline at {tmp_path}; pass --pipeline DIR (a training run's pipeline/ folder)"


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_generate_in_a_real_browser(demo_url: str, tmp_path: Path) -> None:
    """Headless Chromium: tick class 7, press Generate, an image appears; a screenshot goes to tmp_path."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        browser.get(demo_url)
        wait = WebDriverWait(browser, GENERATE_S)
        seven = wait.until(expected_conditions.element_to_be_clickable((By.XPATH, "//*[@id='classes']//label[.//span[text()='7']]")))
        seven.click()
        browser.find_element(By.ID, "generate").click()
        image = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#grid img")))
        wait.until(lambda _: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        status = browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        browser.quit()
    assert "(0, 7)" in status  # class 0 is ticked by default
    assert PIL.Image.open(tmp_path / "demo.png").size[0] > 0


def test_generate_through_gradio_client(demo_url: str) -> None:
    """The page's endpoint: images of the requested classes; bad input is a clear message, the server lives on."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo_url, verbose=False)
    grid, strip, archive, status = client.predict(["3", "7"], 2.0, "dpmsolver++", 4, 0, 2, api_name="/generate")
    assert status.startswith("4 images (3, 7)")
    # 2 rows x 2 columns of 28 px images enlarged 3x (96 // 28) with 2 px padding at that scale
    assert PIL.Image.open(grid).size == (3 * (2 * 28 + 3 * 2),) * 2
    assert PIL.Image.open(strip).size == (3 * (4 * 28 + 5 * 2), 3 * (2 * 28 + 3 * 2))  # 4 steps: 4 columns
    assert Path(archive).stat().st_size > 0
    with pytest.raises(AppError, match=r"num_inference_steps must be >= 1, got 0"):
        client.predict(["3"], 2.0, "dpmsolver++", 0, 0, 1, api_name="/generate")
    with pytest.raises(AppError, match=r"'cat' .*not in the list of choices"):
        client.predict(["cat"], 2.0, "dpmsolver++", 4, 0, 1, api_name="/generate")
    _, _, _, status = client.predict(["1"], 1.0, "ddim", 2, 1, 1, api_name="/generate")  # still serving
    assert status.startswith("1 images (1)")
    # time-varying guidance (docs/samplers.md): a ramp and an interval, named in the status; a bad interval is a message
    _, _, _, status = client.predict(["2"], 3.0, "dpmsolver++", 4, 0, 1, "increasing", "0.3,5", api_name="/generate")
    assert "guidance scale 3.0, increasing ramp, only at noise levels sigma in (0.3, 5]" in status
    with pytest.raises(AppError, match=r"guidance_interval \(lo, hi\) needs 0 <= lo < hi"):
        client.predict(["2"], 3.0, "dpmsolver++", 4, 0, 1, "constant", "5,1", api_name="/generate")
