"""The browser playground (`GET /` on the gateway) in a real browser (Debian's Chromium, driven by Selenium) against
the real stack: a key, a streamed answer with its usage line, Stop cancelling the generation on the server, a wrong
key's error, JSON mode, and the operator view. It saves a screenshot (CHATSERVE_SCREENSHOT=path keeps it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are needed (make browser)"
)


@pytest.fixture(scope="module")
def browser():
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers on the internet
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 120):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def last_answer(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def use_key(driver, key: str) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key, Keys.ENTER)


def ask(driver, text: str) -> None:
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)


def aborted(stack) -> float:
    return sum(v for k, v in stack.metrics().items() if k.startswith("chatserve_aborted_requests_total"))


def test_the_playground_chats_streams_stops_and_shows_the_server(browser, stack, model, tmp_path):
    root = stack.base_url.removesuffix("/v1")
    browser.get(f"{root}/")
    assert browser.title == "chatserve playground"
    use_key(browser, stack.api_key)
    wait(browser, lambda d: [o.text for o in Select(d.find_element(By.ID, "model")).options] == [model])

    # A streamed answer: text arrives in several steps, then the usage line.
    browser.find_element(By.ID, "temperature").send_keys(Keys.HOME)  # 0: greedy
    system = browser.find_element(By.ID, "system")
    system.send_keys("You are a helpful assistant. Answer with a short Markdown list.")
    ask(browser, "What are the three primary colours?")
    wait(browser, lambda d: "finish:" in last_answer(d).find_element(By.CLASS_NAME, "stats").text)
    answer = last_answer(browser)
    assert int(answer.get_attribute("data-chunks")) > 1
    stats = answer.find_element(By.CLASS_NAME, "stats").text
    assert "first token" in stats and "completion" in stats and "prompt" in stats, stats
    assert answer.find_element(By.CLASS_NAME, "content").text.strip()
    assert not browser.find_element(By.ID, "view-server").is_displayed()
    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("CHATSERVE_SCREENSHOT"):
        Path(os.environ["CHATSERVE_SCREENSHOT"]).write_bytes(shot.read_bytes())

    # Stop mid-stream: the generation ends on the server too.
    before = aborted(stack)
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("400")
    ask(browser, "Write a very long story about a dragon who learns to cook, with many chapters.")
    wait(browser, lambda d: int(last_answer(d).get_attribute("data-chunks") or 0) >= 2)
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda d: last_answer(d).get_attribute("data-finish") == "stopped")
    wait(browser, lambda d: aborted(stack) > before, timeout=30)

    # JSON mode answers valid JSON.
    Select(browser.find_element(By.ID, "json-mode")).select_by_value("json_object")
    max_tokens.clear()
    max_tokens.send_keys("80")
    browser.find_element(By.ID, "clear").click()
    ask(browser, "Describe a cat as a JSON object.")
    wait(browser, lambda d: "finish:" in last_answer(d).find_element(By.CLASS_NAME, "stats").text)
    answer = last_answer(browser)
    if answer.get_attribute("data-finish") == "stop":
        assert isinstance(json.loads(answer.find_element(By.CLASS_NAME, "content").get_attribute("data-text")), dict)

    # The operator view: the model, its context window, live figures.
    browser.find_element(By.ID, "tab-server").click()
    wait(browser, lambda d: d.find_element(By.ID, "s-model").text == model, timeout=30)
    assert browser.find_element(By.ID, "s-health").text == "serving"
    assert browser.find_element(By.ID, "s-replicas").text == "1 of 1"
    assert "context" in browser.find_element(By.ID, "s-context").text
    wait(browser, lambda d: d.find_element(By.ID, "s-tps").text not in ("…", ""), timeout=30)
    browser.find_element(By.ID, "tab-chat").click()

    # Keyboard: Shift+Enter is a new line, not a send; the page fits a phone-sized window.
    prompt = browser.find_element(By.ID, "prompt")
    sent = len(browser.find_elements(By.CSS_SELECTOR, ".msg.user"))
    prompt.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert prompt.get_attribute("value") == "first line\nsecond line"
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == sent
    prompt.clear()
    browser.set_window_size(390, 844)
    assert prompt.is_displayed() and browser.find_element(By.ID, "send").is_displayed()
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 390
    browser.set_window_size(1280, 900)

    # A wrong key says so.
    use_key(browser, "sk-wrong-" + "w" * 20)
    wait(browser, lambda d: "API key was refused" in d.find_element(By.ID, "error").text, timeout=30)


def test_the_page_needs_no_key_and_loads_nothing_from_elsewhere(stack):
    import httpx

    root = stack.base_url.removesuffix("/v1")
    page = httpx.get(f"{root}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/playground/playground.js", "/playground/playground.css"):
        reply = httpx.get(f"{root}{asset}", timeout=30)
        assert reply.status_code == 200 and "https://" not in reply.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    escape = httpx.get(f"{root}/playground/..%2Fgateway%2Fapp.py", timeout=30)
    assert escape.status_code == 404 and "import" not in escape.text
    assert httpx.get(f"{root}/playground/nope.js", timeout=30).status_code == 404
