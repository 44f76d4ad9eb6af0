"""The web demo (``python -m pipeline.demo``) served in a subprocess, driven by headless Chromium and by gradio_client."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import httpx
import PIL.Image
import pytest
import torch

from pipeline.config import SampleConfig
from pipeline.demo import MAX_IMAGE_STEPS, MAX_IMAGES, MAX_STEPS, Generator, Model, display_name, page_message

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
STARTUP_S = 240  # a loaded 2-core machine takes long to import gradio, torch and diffusers
GENERATE_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo(NamedTuple):
    url: str
    tmp: Path  # the server's TMPDIR: its own folder of zips and Gradio's cache
    process: subprocess.Popen
    model: str  # the page's default model (its name on the switch)


@contextmanager
def served_demo(pipeline: Path, folder: Path) -> Iterator[Demo]:
    """``python -m pipeline.demo --pipeline pipeline`` on a free localhost port, its log and temporary files (TMPDIR)
    in ``folder``; stopped with SIGTERM on exit."""
    port, tmp, log = free_port(), folder / "tmp", folder / "demo.log"
    tmp.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}
    env |= {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp)}
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline.demo", "--pipeline", str(pipeline), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_S
        while url.rstrip("/") not in log.read_text():
            assert server.poll() is None, f"the demo exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the demo did not start in {STARTUP_S} s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield Demo(url, tmp, server, display_name(pipeline))
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def demo(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo of the tiny run's export; stopped after the module."""
    with served_demo(tiny_run / "pipeline", tmp_path_factory.mktemp("demo")) as served:
        yield served


@pytest.fixture
def demo_url(demo: Demo) -> str:
    return demo.url


@pytest.mark.parametrize(("where", "message"), [
    ("{tmp}", "--pipeline {tmp} is not an exported pipeline (no model_index.json); pass a training run's pipeline/ folder"),
    ("{tmp}/absent", "--pipeline: no such folder: {tmp}/absent; pass a training run's pipeline/ folder"),
], ids=["not-an-export", "no-such-folder"])
def test_bad_command_line_is_one_clear_line(where: str, message: str, tmp_path: Path) -> None:
    """The check every ``--pipeline`` shares (``sample_flags.pipeline_location``): one line, exit 2, never the hub
    client's "Repo id must use alphanumeric chars"."""
    result = subprocess.run([sys.executable, "-m", "pipeline.demo", "--pipeline", where.replace("{tmp}", str(tmp_path))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message.replace('{tmp}', str(tmp_path))}") and result.stderr.count("\n") == 1


@contextmanager
def chromium():
    """Headless Chromium through Selenium (Debian's chromium and chromium-driver), quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield browser
    finally:
        browser.quit()


def press_generate(browser, wait) -> str:
    """Press Generate and wait for the new status line (Gradio's progress display inside it hidden again)."""
    from selenium.webdriver.common.by import By

    before = browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda _: browser.find_element(By.ID, "status").text not in ("", before)
               and browser.find_elements(By.CSS_SELECTOR, "#status [data-testid='status-tracker'].hide"))
    return browser.find_element(By.ID, "status").text


needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                                                                            "(.ci/run installs them)")


@pytest.mark.browser
@needs_chromium
def test_generate_in_a_real_browser(demo_url: str, tiny_run: Path, tmp_path: Path) -> None:
    """Headless Chromium: tick class 7, press Generate, an image appears; a screenshot goes to tmp_path. A bad value
    then shows only its message, in the page's words, in the status line, with the last result gone; a good request
    shows only its result. The title names the run, not a path of the machine."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def status_after(**values: str) -> str:
        """Type each value into the field with that elem_id, press Generate, and wait for the new status."""
        for field, value in values.items():
            box = browser.find_element(By.CSS_SELECTOR, f"#{field} input, #{field} textarea")
            box.send_keys(Keys.CONTROL, "a", Keys.DELETE)
            box.send_keys(value)
        return press_generate(browser, wait)

    with chromium() as browser:
        browser.get(demo_url)
        wait = WebDriverWait(browser, GENERATE_S)
        seven = wait.until(expected_conditions.element_to_be_clickable((By.XPATH, "//*[@id='classes']//label[.//span[text()='7']]")))
        seven.click()
        browser.find_element(By.ID, "generate").click()
        image = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#grid img")))
        wait.until(lambda _: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        status = browser.find_element(By.ID, "status").text
        browser.save_screenshot(str(tmp_path / "demo.png"))
        title, heading = browser.title, browser.find_element(By.TAG_NAME, "h1").text
        switch_shown = any(element.is_displayed() for element in browser.find_elements(By.ID, "model"))
        bad_steps = status_after(steps="0")
        grids_after_error = browser.find_elements(By.CSS_SELECTOR, "#grid img")
        bad_interval = status_after(steps="2", interval="5,1")
        good = status_after(interval="")
    assert "(0, 7)" in status and "Error" not in status  # class 0 is ticked by default
    assert PIL.Image.open(tmp_path / "demo.png").size[0] > 0
    assert title == heading == f"Class-conditional DDPM: {tiny_run.name}"  # the run's name; the old page showed its path
    assert not switch_shown  # one model: no switch
    assert bad_steps == "Error: Steps must be a whole number from 1 to 1000, got 0"  # the message alone, in the label's word
    assert not grids_after_error  # the last result's grid is gone with its status
    assert bad_interval.startswith("Error: Guidance interval (lo, hi) needs 0 <= lo < hi") and "guidance_interval" not in bad_interval
    assert re.match(r"\d+ images \(0, 7\) in ", good) and "Error" not in good


@pytest.mark.browser
@needs_chromium
def test_a_student_opens_with_a_switch_to_its_teacher(tiny_student: Path, tiny_run: Path, tmp_path: Path) -> None:
    """Issue 26: the page of a distilled student opens on the student, with a switch to its teacher (its config's
    distill.teacher). Each model brings its own sampler and steps to the fields, and the status names the model and
    its U-Net evaluations per image: the student's 4 DDIM steps at one each, the teacher's guided steps at two."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def steps_field() -> str:
        return browser.find_element(By.CSS_SELECTOR, "#steps input").get_attribute("value")

    with served_demo(tiny_student / "pipeline", tmp_path) as demo, chromium() as browser:
        browser.get(demo.url)
        wait = WebDriverWait(browser, GENERATE_S)
        wait.until(expected_conditions.element_to_be_clickable((By.ID, "generate")))
        choices = [label.text for label in browser.find_elements(By.CSS_SELECTOR, "#model label")]
        student_steps, student = steps_field(), press_generate(browser, wait)
        browser.find_element(By.XPATH, "//*[@id='model']//label[contains(., 'its teacher')]").click()
        wait.until(lambda _: steps_field() != student_steps)
        teacher_steps, teacher = steps_field(), press_generate(browser, wait)
    assert choices == ["student (distilled student)", f"{tiny_run.name} (its teacher)"]
    assert (student_steps, teacher_steps) == ("4", "3")  # the student's grid; tiny_run's sample.num_inference_steps
    assert student.startswith("student (distilled student): 4 images (0) in ") and ": ddim, 4 steps" in student
    assert "4 U-Net evaluations per image" in student
    assert teacher.startswith(f"{tiny_run.name} (its teacher): 4 images (0) in ") and "3 steps" in teacher
    assert "6 U-Net evaluations per image" in teacher


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
    with pytest.raises(AppError, match=r"Steps must be a whole number from 1 to 1000, got 0"):
        client.predict(["3"], 2.0, "dpmsolver++", 0, 0, 1, api_name="/generate")
    with pytest.raises(AppError, match=r"'cat' .*not in the list of choices"):
        client.predict(["cat"], 2.0, "dpmsolver++", 4, 0, 1, api_name="/generate")
    _, _, _, status = client.predict(["1"], 1.0, "ddim", 2, 1, 1, api_name="/generate")  # still serving
    assert status.startswith("1 images (1)")
    # time-varying guidance (docs/samplers.md): a ramp and an interval, named in the status; a bad interval is a message
    _, _, _, status = client.predict(["2"], 3.0, "dpmsolver++", 4, 0, 1, "increasing", "0.3,5", api_name="/generate")
    assert "guidance scale 3.0, increasing ramp, only at noise levels sigma in (0.3, 5]" in status
    with pytest.raises(AppError, match=r"Guidance interval \(lo, hi\) needs 0 <= lo < hi"):
        client.predict(["2"], 3.0, "dpmsolver++", 4, 0, 1, "constant", "5,1", api_name="/generate")


# ---- issue 24: bounded work, safe zip names, no files left behind -------------------------------------------------


def raw_call(url: str, body: str) -> str:
    """POST ``body`` (JSON text, which may hold ``Infinity`` and ``NaN``: gradio_client cannot send them) to the
    ``/generate`` endpoint of Gradio's REST API; the event stream of the answer."""
    posted = httpx.post(f"{url}gradio_api/call/generate", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    posted.raise_for_status()
    return httpx.get(f"{url}gradio_api/call/generate/{posted.json()['event_id']}", timeout=GENERATE_S).text


def test_the_work_of_one_request_is_bounded_and_bad_values_are_messages(demo: Demo) -> None:
    """A cap on steps, images and images x steps; a class asked for 5000 times is sampled once; inf, NaN, 2.5, a
    negative seed: each a message naming the field, and the server serves on. A request's zip goes when the next
    one starts."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo.url, verbose=False)
    with pytest.raises(AppError, match=rf"Steps must be a whole number from 1 to {MAX_STEPS}, got 1000000$"):
        client.predict(["3"], 2.0, "dpmsolver++", 10**6, 0, 1, api_name="/generate")
    with pytest.raises(AppError, match=r"Steps must be a whole number from 1 to 1000, got 2.5"):
        client.predict(["3"], 2.0, "dpmsolver++", 2.5, 0, 1, api_name="/generate")
    with pytest.raises(AppError, match=r"Seed must be a whole number from 0 to 4294967295, got -1"):
        client.predict(["3"], 2.0, "dpmsolver++", 2, -1, 1, api_name="/generate")
    ten = [str(i) for i in range(10)]  # 80 images: the most one request may ask for, at up to 100 steps
    with pytest.raises(AppError, match=rf"80 images x 101 steps is more work than one request may ask for \(at most {MAX_IMAGE_STEPS}"):
        client.predict(ten, 2.0, "dpmsolver++", 101, 0, 8, api_name="/generate")
    with pytest.raises(AppError, match=r"Classes: none ticked; tick at least one class"):
        client.predict([], 2.0, "dpmsolver++", 2, 0, 1, api_name="/generate")
    _, _, archive, status = client.predict(["0"] * 5000, 1.0, "ddim", 2, 0, 2, api_name="/generate")
    assert status.startswith("2 images (0) in ")
    assert zipfile.ZipFile(archive).namelist() == ["000_0.png", "001_0.png"]
    for value in ("Infinity", "NaN"):  # Gradio's own rounding raised OverflowError / ValueError: a bare "Error"
        events = raw_call(demo.url, f'{{"data": [["3"], 2.0, "dpmsolver++", {value}, 0, 1, "constant", "", "{demo.model}"]}}')
        assert "event: error" in events and f"Steps must be a whole number from 1 to 1000, got {value.lower()[:3]}" in events
    _, _, _, status = client.predict(["1"], 1.0, "ddim", 2, 1, 1, api_name="/generate")  # still serving
    assert status.startswith("1 images (1)")
    (out_dir,) = demo.tmp.glob("ddpm-demo-*")
    assert [path.relative_to(out_dir).parts[1:] for path in out_dir.rglob("*") if path.is_file()] == [("samples.zip",)]


def test_messages_name_the_fields_by_the_labels_on_the_page() -> None:
    """The shared checks' names for the page's fields (the pipeline's ``class_labels``, the settings'
    ``guidance_interval``) become the labels the page shows; other words stay."""
    assert page_message("class_labels is empty; pass at least one label") == "Classes is empty; pass at least one label"
    assert page_message("guidance_ramp 'increasing' at guidance_scale 0.2 gives steps the negative weight -0.6; use "
                        "guidance_scale >= 0.5") == ("Guidance ramp 'increasing' at Guidance scale 0.2 gives steps the negative "
                                                     "weight -0.6; use Guidance scale >= 0.5")
    assert page_message("sampler: 'dpm' is not allowed; did you mean dpmsolver++, ddpm, ddim?").startswith("Sampler: 'dpm'")
    assert page_message("num_inference_steps must be >= 1, got 0") == "Steps must be >= 1, got 0"


def test_the_page_names_a_pipeline_without_a_path_of_the_machine(tmp_path: Path) -> None:
    """A training run's pipeline/ by the run's name, another folder by its own, a hub id as it is."""
    (tmp_path / "quickstart" / "pipeline").mkdir(parents=True)
    assert display_name(tmp_path / "quickstart" / "pipeline") == "quickstart"
    assert display_name(str(tmp_path / "quickstart")) == "quickstart"
    assert display_name("someone/cifar10-ddpm") == "someone/cifar10-ddpm"


def test_too_many_images_are_refused_before_sampling(tmp_path: Path) -> None:
    """More classes x images than ``MAX_IMAGES`` (a data set of many classes) is a message; nothing is sampled."""
    generator = Generator({"m": Model(SimpleNamespace(), False, SampleConfig())}, out_dir=tmp_path)  # a pipe it must not touch
    classes = [f"class {i}" for i in range(MAX_IMAGES // 8 + 1)]
    with pytest.raises(ValueError, match=rf"11 classes x 8 images is 88 images, more than one request may ask for \({MAX_IMAGES}\)"):
        generator(classes, 1.0, "ddim", 2, 0, 8)


def test_zip_names_are_safe_readable_and_unique(tmp_path: Path) -> None:
    """Fashion-MNIST's "T-shirt/top" (a "/" made the zip fail with FileNotFoundError), a path, spaces, an empty or a
    long name: one flat, readable, unique PNG name each, written straight into the zip."""
    names = ["T-shirt/top", "../../etc/passwd", "a b", "", "\u00e9t\u00e9", "x" * 300]
    generator = Generator({}, out_dir=tmp_path)
    archive = generator._archive(torch.rand(7, 1, 4, 4), torch.tensor([0, 0, 1, 2, 3, 4, 5]), names)
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == ["000_T-shirt_top.png", "001_T-shirt_top.png", "002_etc_passwd.png", "003_a_b.png",
                                 "004_class.png", "005_\u00e9t\u00e9.png", f"006_{'x' * 48}.png"]
        assert PIL.Image.open(zf.open("000_T-shirt_top.png")).size == (4, 4)
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == [archive]


def test_requests_do_not_accumulate_files(tmp_path: Path) -> None:
    """Each request's zip replaces the previous request's folder (Gradio serves its own copy of that one)."""
    generator = Generator({}, out_dir=tmp_path)
    archives = [generator._archive(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), ["0", "1"]) for _ in range(3)]
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == [archives[-1]]


@pytest.mark.slow
def test_a_stopped_demo_leaves_no_files(tiny_run: Path, tmp_path: Path) -> None:
    """SIGTERM (docker stop, kill) stops the server as Ctrl+C does: exit 0, its zips and Gradio's copies deleted."""
    from gradio_client import Client

    with served_demo(tiny_run / "pipeline", tmp_path) as demo:
        Client(demo.url, verbose=False).predict(["3"], 1.0, "ddim", 2, 0, 1, api_name="/generate")
        assert [path for path in demo.tmp.rglob("*") if path.is_file()]  # the zip, the grid and their cached copies
    assert demo.process.returncode == 0
    assert not [path for path in demo.tmp.rglob("*") if path.is_file()]
