"""The web page in headless Chromium: upload a real image, see the decision, bars and the Grad-CAM overlay."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_serve import start_app

pytestmark = pytest.mark.timeout(300)  # includes the module's app start on a loaded 2-core machine

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(trained_run, tmp_path_factory, browser):
    from ray import serve

    url = start_app(trained_run.root, tmp_path_factory.mktemp("web"))
    yield url
    serve.shutdown()


def wait_for(driver, condition, seconds: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: condition(d))


def test_upload_shows_decision_bars_and_overlay(browser, page_url, ham10000_fullres, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    image = sorted((ham10000_fullres / "images").glob("*.jpg"))[0]
    browser.get(page_url + "/")
    wait_for(browser, lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3)
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait_for(browser, lambda d: d.find_element(By.ID, "result").is_displayed())
    overlay = browser.find_element(By.ID, "overlay")
    wait_for(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == 32  # the preprocessed size
    decision = browser.find_element(By.ID, "decision")
    assert decision.get_attribute("class") in ("malignant", "benign", "uncertain")
    assert "Malignant probability" in decision.text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 7
    assert "ensemble" in browser.find_element(By.ID, "overlay-caption").text
    assert browser.find_element(By.ID, "error").is_displayed() is False

    Select(browser.find_element(By.ID, "model")).select_by_value("custom_cnn")
    wait_for(browser, lambda d: "custom_cnn" in d.find_element(By.ID, "overlay-caption").text)
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web.png"))

    truncated = tmp_path / "broken.jpg"
    truncated.write_bytes(image.read_bytes()[:5000])
    browser.find_element(By.ID, "file").send_keys(str(truncated))
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda d: error.is_displayed())
    assert "broken.jpg" in error.text and "truncated" in error.text and "400" in error.text

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(text_file))
    wait_for(browser, lambda d: "not a JPEG" in error.text)


def test_swagger_docs_render_offline(browser, page_url):
    from selenium.webdriver.common.by import By

    browser.get(page_url + "/docs")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 4, seconds=60)
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/predict", "/v1/explain"} <= paths

