"""End to end in a real browser: a search logs to a tracking server; headless Chromium shows it.

Starts the MLflow server (autorank.tracking.server), runs `autorank search --mlflow-uri` on digits, then
drives Debian's Chromium through Selenium to the experiment and checks what a user must see: the
parent run, every trial nested under it, exactly the Pareto-tagged trials under the `pareto`
filter, the Pareto plot artifact rendered as an image, and the interactive one drawn by plotly.js. Set AUTORANK_SCREENSHOTS=docs to
refresh the screenshots kept in docs/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from autorank.tracking.server import ServerConfig, classic_runs_page, start_server, stop_server

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = ("Chromium is not installed (scripts/install_system_deps.sh installs chromium)" if not CHROMIUM else
           "chromedriver is not installed (scripts/install_system_deps.sh installs chromium-driver)"
           if not CHROMEDRIVER else None)

SPACE = """\
name: browse
methods: [none, tucker2, svd]
precisions: [fp32, int8]
constraints:
  max_drop: 30.0
finetune:
  steps: 10
  batch_size: 32
search:
  sampler: random
  trials: 5
  seed: 0
"""
RUN_NAMES = "[col-id='attributes.`Run Name`'] a"
WAIT_S = 60


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="autorank-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1600,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def server(tmp_path):
    cfg = ServerConfig(port=0, data_dir=tmp_path / "server")
    state = start_server(cfg)
    try:
        yield state["url"]
    finally:
        stop_server(cfg)


def pretrained_digits_cnn(tmp_path: Path) -> Path:
    """The small CNN trained briefly on digits, so that trials differ in accuracy (a real front)."""
    import torch

    from autorank import engine
    from autorank.data import load_data
    from autorank.models import create_model

    data = load_data("digits")
    model = create_model("small_cnn", data)
    engine.train(model, data, engine.TrainConfig(steps=80, batch_size=64, lr=0.05, device="cpu"))
    torch.save(model.state_dict(), tmp_path / "small_cnn_digits.pt")
    return tmp_path / "small_cnn_digits.pt"


def visible_run_names(driver) -> list[str]:
    """Run names in the runs table (empty while the table re-renders under us)."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return [e.text for e in driver.find_elements("css selector", RUN_NAMES) if e.text]
    except StaleElementReferenceException:
        return []


def screenshot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("AUTORANK_SCREENSHOTS"):
        shutil.copy(tmp_path / name, REPO / os.environ["AUTORANK_SCREENSHOTS"] / name)


@pytest.mark.browser
@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
def test_search_front_is_visible_in_the_mlflow_ui(tmp_path, server, browser):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    space = tmp_path / "browse.yaml"
    space.write_text(SPACE)
    out = tmp_path / "search"
    done = subprocess.run([sys.executable, "-m", "autorank", "search", "--config", str(space), "--model", "small_cnn",
                           "--weights", str(pretrained_digits_cnn(tmp_path)), "--data", "digits", "--out", str(out),
                           "--mlflow-uri", server, "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("autorank")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("autorank.kind") == "search")
    trials = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    pareto = {r.info.run_name for r in runs if r.data.tags.get("pareto") == "true"}
    assert len(trials) == 5 and pareto and pareto < trials

    wait = WebDriverWait(browser, WAIT_S)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    browser.get(classic_runs_page(server, "autorank"))  # the page `autorank ui` prints: the classic runs view
    wait.until(lambda d: parent.info.run_name in visible_run_names(d))
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # the assistant side panel
    browser.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()  # expand
    wait.until(lambda d: trials <= set(visible_run_names(d)))
    screenshot(browser, tmp_path, "mlflow_search_runs.png")

    search_box = browser.find_element(By.CSS_SELECTOR, "input[placeholder*='metrics.']")
    search_box.send_keys("tags.pareto = 'true'", Keys.ENTER)
    wait.until(lambda d: "searchFilter=tags.pareto" in d.current_url
               and set(visible_run_names(d)) == pareto | {parent.info.run_name})
    screenshot(browser, tmp_path, "mlflow_pareto_runs.png")

    browser.get(f"{server}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts/pareto.png"
                "?workflowType=machine_learning")
    for name in ("pareto.csv", "pareto.html", "pareto.json", "pareto.png"):
        wait.until(ec.presence_of_element_located((By.XPATH, f"//*[normalize-space(text())='{name}']")))
    image = wait.until(lambda d: next((i for i in d.find_elements(By.TAG_NAME, "img")
                                       if i.get_attribute("src").startswith("blob:")
                                       and int(i.get_attribute("naturalWidth") or 0) > 0), None))
    assert int(image.get_attribute("naturalWidth")) >= 400  # the rendered plot, not a broken-image icon
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()
    screenshot(browser, tmp_path, "mlflow_pareto_plot.png")

    # the interactive front renders too: plotly.js is not embedded but loaded from the run's single copy
    browser.find_element(By.XPATH, "//*[normalize-space(text())='pareto.html']").click()
    frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe.mlflow-html-iframe")))
    browser.switch_to.frame(frame)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".plotly-graph-div .main-svg"))
    browser.switch_to.default_content()
