"""The playground page at / in headless Chromium: it loads, runs one prompt, shows outputs side by side.

Needs Debian's `chromium` and `chromium-driver` packages and the `selenium` Python package; skipped
(with the reason) when any is missing.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from test_serve_api import BASE, KEY, complete, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the selenium package is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="loratune-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("playground"))
    yield server
    server.stop()


def test_playground_shows_base_and_adapters_side_by_side(browser, live):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    prompt = "Once upon a time"
    browser.get(f"{live.url}/?key={KEY}")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input")) == 3)
    boxes = {b.get_attribute("value"): b for b in browser.find_elements(By.CSS_SELECTOR, "#models input")}
    assert set(boxes) == {BASE, "a1", "a2"} and all(b.is_selected() for b in boxes.values())
    Select(browser.find_element(By.ID, "mode")).select_by_value("completion")
    for field, value in (("max_tokens", "8"), ("temperature", "0")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")

    columns = browser.find_elements(By.CSS_SELECTOR, "#outputs .column")
    assert [c.get_attribute("data-model") for c in columns] == [BASE, "a1", "a2"]
    assert all(c.get_attribute("data-state") == "done" for c in columns)
    tops = {c.location["y"] for c in columns}
    assert len(tops) == 1  # side by side: one row
    shown = {c.get_attribute("data-model"): c.find_element(By.TAG_NAME, "pre").get_attribute("textContent")
             for c in columns}
    client = live.client()
    for model in (BASE, "a1", "a2"):
        assert shown[model] == complete(client, model, prompt=prompt, max_tokens=8).choices[0].text
    assert len(set(shown.values())) == 3


def test_playground_autoruns_chat_from_query_parameters(browser, live):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live.url}/?key={KEY}&prompt=Hi&models={BASE},a2&mode=chat&max_tokens=6&temperature=0&autorun=1")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    columns = browser.find_elements(By.CSS_SELECTOR, "#outputs .column")
    assert [c.get_attribute("data-model") for c in columns] == [BASE, "a2"]
    client = live.client()
    for column in columns:
        model = column.get_attribute("data-model")
        expected = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=6, temperature=0).choices[0].message.content
        assert column.find_element(By.TAG_NAME, "pre").get_attribute("textContent") == expected
