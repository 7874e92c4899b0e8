"""Both pages in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ./scripts/test installs) driven by Selenium against a real gateway
process, with a worker writing to MySQL beside it.

- the try-it page: claim a coupon with the keyboard, see ``accepted``, then ``issued``; a
  second claim is a duplicate;
- the console: sign in with the admin token, then watch a small drop reach its sold-out state
  and every coupon issued, without a reload.

Each test saves a screenshot under ``reports/browser/`` (the README shows the console's).
Selenium is synchronous: its calls run in a thread, so the event loop keeps the worker going.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from shared.settings import Settings
from tests.conftest import ADMIN_TOKEN, CouponFactory
from tests.helpers import GatewayProcess, child_env
from tests.invariants import Checker
from tests.servers import REPO

SCREENSHOTS = REPO / "reports" / "browser"
WAIT_SECONDS = 20.0
T = TypeVar("T")


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
        )
        if found:
            return found
    raise AssertionError(f"none of {names} is installed: ./scripts/test installs them")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(_binary("chromedriver")))
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def gateway(settings: Settings, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    with GatewayProcess(settings, tmp_path / "gateway.log") as process:
        yield process


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[None]:
    """A worker process (``python -m stream_worker``, its heartbeat included) writing accepted
    requests to MySQL while the test runs; stopped with SIGTERM."""
    with (tmp_path / "worker.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stream_worker"], cwd=REPO, env=child_env(settings),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def in_browser(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


async def until(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """Wait (in the browser's thread) until ``condition`` holds; fail with ``what``."""
    wait = WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1)
    return await in_browser(lambda: wait.until(condition, message=what))


def text_of(driver: WebDriver, selector: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def screenshot(driver: WebDriver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    assert driver.save_screenshot(str(path)), path
    return path


def labelled(driver: WebDriver) -> None:
    """Every visible form control has a label that names it (the pages' accessibility floor)."""
    for control in driver.find_elements(By.CSS_SELECTOR, "input, textarea, select"):
        if control.is_displayed():
            control_id = control.get_attribute("id")
            labels = driver.find_elements(By.CSS_SELECTOR, f"label[for='{control_id}']")
            assert labels, f"no label for #{control_id}"
            assert labels[0].text.strip()


async def test_the_try_page_claims_a_coupon_and_follows_it_to_issued(
    browser: WebDriver,
    gateway: GatewayProcess,
    worker: None,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    drop = await make_coupon(total=3, title="Try-it drop")
    await in_browser(lambda: browser.set_window_size(412, 915))  # a phone's screen
    await in_browser(lambda: browser.get(f"{gateway.url}/try/{drop.id}"))
    await until(browser, lambda d: text_of(d, "#remaining") == "3", "the live remaining count")
    await until(browser, lambda d: text_of(d, "#connection") == "Live", "the feed connected")
    assert text_of(browser, "#phase") == "Open"
    assert "Try-it drop" in text_of(browser, "#title")
    labelled(browser)
    # The keyboard alone: type the id and press Enter.
    field = await in_browser(lambda: browser.find_element(By.ID, "user-id"))
    await in_browser(lambda: field.send_keys("42", Keys.ENTER))
    await until(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#answer [data-outcome='accepted']"),
        "the answer 'accepted'",
    )
    await until(
        browser,
        lambda d: d.find_element(By.ID, "status-log").get_attribute("data-status") == "issued",
        "the status 'issued'",
    )
    await until(browser, lambda d: text_of(d, "#remaining") == "2", "remaining told live")
    screenshot(browser, "try.png")
    # The same user again: a duplicate, said in words.
    await in_browser(lambda: browser.find_element(By.ID, "request").click())
    await until(
        browser,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#answer [data-outcome='duplicate']"),
        "the answer 'duplicate'",
    )
    await check_invariants(drop, accepted={42})


async def test_the_console_shows_a_drop_reach_sold_out_without_a_reload(
    browser: WebDriver,
    gateway: GatewayProcess,
    worker: None,
    make_coupon: CouponFactory,
    check_invariants: Checker,
) -> None:
    total, users = 30, 45
    drop = await make_coupon(total=total, title="Console drop")
    await in_browser(lambda: browser.get(f"{gateway.url}/admin/console"))
    # Signed out: the sign-in form. Sign in with the token.
    token = await in_browser(lambda: browser.find_element(By.ID, "token"))
    labelled(browser)
    await in_browser(lambda: token.send_keys(ADMIN_TOKEN, Keys.ENTER))
    card = f"article[data-coupon-id='{drop.id}']"
    await until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, card), "the coupon's card")
    await until(
        browser,
        lambda d: text_of(d, f"{card} [data-counter='remaining']") == str(total),
        "the full stock",
    )
    await in_browser(lambda: browser.execute_script("window.notReloaded = true;"))
    accepted: set[int] = set()
    async with aiohttp.ClientSession() as session:
        for user in range(1, users + 1):  # a few seconds of drop, so the chart has a curve
            async with session.post(
                f"{gateway.url}/v1/coupons/{drop.id}/issues", json={"user_id": user}
            ) as response:
                if response.status == 202:
                    accepted.add(user)
                else:
                    assert response.status == 409, await response.text()
            await asyncio.sleep(0.1)  # pacing the clicks, not waiting on a condition
    assert len(accepted) == total

    def sold_out_and_issued(driver: WebDriver) -> bool:
        state = driver.find_element(By.CSS_SELECTOR, card).get_attribute("data-state")
        counters = {
            name: text_of(driver, f"{card} [data-counter='{name}']")
            for name in ("remaining", "issued", "pending")
        }
        return state == "sold_out" and counters == {
            "remaining": "0", "issued": str(total), "pending": "0"
        }  # fmt: skip

    await until(browser, sold_out_and_issued, "sold out, every coupon issued, nothing pending")
    assert await in_browser(lambda: browser.execute_script("return window.notReloaded === true;"))
    assert "Sold out at" in text_of(browser, f"{card} .sold-out-at")
    assert text_of(browser, "#connection") == "Live"
    assert "workers alive: 1" in text_of(browser, "#summary")
    await until(browser, lambda d: d.find_element(By.ID, "all-clear").is_displayed(), "no warning")
    screenshot(browser, "console.png")
    # Signing out (the button posts a form from the page) leads back to the sign-in form.
    button = await in_browser(lambda: browser.find_element(By.CSS_SELECTOR, "form button"))
    await in_browser(button.click)
    await until(browser, lambda d: d.find_elements(By.ID, "token"), "the sign-in form again")
    await check_invariants(drop, accepted=accepted, rejected=set(range(1, users + 1)) - accepted)
