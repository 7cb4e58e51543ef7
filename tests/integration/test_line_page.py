"""The live page in a real headless browser: Debian's chromium driven over chromedriver (selenium).

Skipped, with the reason, where chromium, chromedriver or selenium is missing (.ci/run installs
the first two as root). Nothing is downloaded at run time: selenium is given both executables,
so its driver manager never runs. The screenshot is saved under tmp_path; set
MUSC_EDGE_PAGE_SCREENSHOT=FILE to also copy it there (docs/line_page.png was made so).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_line_http import TOKEN, add_results, status  # noqa: E402

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium "
                                                              "(in the dev extra)")
pytest.importorskip("prometheus_client", reason="prometheus-client is not installed: pip install 'musc-edge[line]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from musc_edge.watch.http import LiveServer  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/lib/chromium/chromedriver",)
                                                     if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="no chromium/chromedriver: apt-get install -y chromium chromium-driver "
                                       "(.ci/run does this when run as root)")


@pytest.fixture
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1360,1180", "--hide-scrollbars", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def test_the_page_loads_clean_and_follows_new_results(browser, tmp_path) -> None:
    add_results(tmp_path, range(20))
    st = status()
    st.update(model_loaded=True, pool_size=28, queue_length=1)
    st.observe("features", 0.041)
    st.observe("scoring", 0.118)
    wait = WebDriverWait(browser, 20, poll_frequency=0.1)
    with LiveServer(tmp_path / "out" / "results.jsonl", st, port=0, token=TOKEN) as server:
        browser.get(server.url + f"?token={TOKEN}")  # the link an operator gets; the cookie carries it on
        assert browser.current_url == server.url  # the token left the address bar
        wait.until(lambda d: text(d, "#scored") == "20")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#latest .tile")) == 12)
        tiles = browser.find_elements(By.CSS_SELECTOR, "#latest .tile")
        assert tiles[0].get_attribute("data-seq") == "19" and tiles[-1].get_attribute("data-seq") == "8"
        assert text(browser, "#anomalous") == "4" and text(browser, "#ready") == "ready"
        assert browser.find_element(By.ID, "trend").get_attribute("data-points") == "20"
        assert browser.find_elements(By.CSS_SELECTOR, "#threshold-line")  # the threshold is drawn
        assert "anomalous" in tiles[0].get_attribute("class")  # seq 19: 19 % 5 == 4
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('#latest img')).every(i => i.complete && i.naturalWidth > 0)"))
        # new results appear without a reload: grid, counts and chart follow
        add_results(tmp_path, range(20, 26))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#latest .tile").get_attribute("data-seq") == "25")
        assert text(browser, "#scored") == "26"
        wait.until(lambda d: d.find_element(By.ID, "trend").get_attribute("data-points") == "26")
        assert "24 / 32" in text(browser, "#fill") and "vit_b16_224.onnx" in text(browser, "#model")
        # 10 parts per second for 3 s: the page keeps up (one poll behind at most)
        for i in range(26, 56, 3):
            add_results(tmp_path, range(i, i + 3))
            time.sleep(0.3)
        wait.until(lambda d: text(d, "#scored") == "56", "the page fell behind")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#latest .tile").get_attribute("data-seq") == "55")
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('#latest img')).every(i => i.complete && i.naturalWidth > 0)"))
        shot = tmp_path / "line_page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("MUSC_EDGE_PAGE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["MUSC_EDGE_PAGE_SCREENSHOT"])
        assert severe(browser) == []  # no console errors, no failed loads


def test_without_the_token_the_page_gets_nothing(browser, tmp_path) -> None:
    add_results(tmp_path, range(3))
    with LiveServer(tmp_path / "out" / "results.jsonl", status(), port=0, token=TOKEN) as server:
        browser.get(server.url)
        assert "token required" in browser.page_source
        browser.get(server.url + "?token=wrong-token-0123456789")
        assert "token required" in browser.page_source
