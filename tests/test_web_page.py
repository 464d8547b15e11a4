"""The web page at / in headless Chromium: search, click a result (the click is stored in the session),
and the lifecycle panel refuses without an API key and shows the blue model with one.

Chromium is Debian's (`make browser` installs it); Playwright only drives it, never downloads one.
"""

from __future__ import annotations

import os

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"{CHROMIUM} is absent: `make browser` installs Debian's chromium "
                                       "(as root with apt-get)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.set_default_timeout(30_000)
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_search_click_and_lifecycle_panel(page, api, stack, loaded_collection):
    from playwright.sync_api import expect

    _, queries, _ = loaded_collection
    query = next(iter(queries.values()))
    response = page.goto(stack.serve_url + "/")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")

    page.fill("#query", query)
    page.press("#query", "Enter")
    first = page.locator("#results .result").first
    expect(first).to_be_visible()
    expect(page.locator("#search-error")).to_be_hidden()
    session_id = page.locator("#results").get_attribute("data-session-id")
    item_id = first.get_attribute("data-id")
    assert session_id and item_id

    first.click()
    expect(first).to_have_attribute("data-clicked", "")  # set once the API accepted the event
    session = api.get(f"/v1/sessions/{session_id}")
    assert session.status_code == 200, session.text
    body = session.json()
    assert body["query"] == query
    assert [(e["item_id"], e["type"]) for e in body["events"]] == [(item_id, "click")]

    # The lifecycle panel is an admin view: the API's 401 until the key is given, then the blue model.
    expect(page.locator("#lc-error")).to_contain_text("needs an API key")
    page.fill("#api-key", api.headers["X-API-Key"])
    page.click("#key-button")
    blue = api.get("/v1/lifecycle").json()["blue"]
    expect(page.locator("#lc-blue .version")).to_have_text(f"v{blue['model_version']}")
    expect(page.locator("#lc-blue .collection")).to_have_text(blue["collection"])
    expect(page.locator("#lc-error")).to_be_hidden()

    if os.environ.get("ES_RAY_WEB_SCREENSHOT"):  # a picture of the page for a person to look at
        page.screenshot(path=os.environ["ES_RAY_WEB_SCREENSHOT"], full_page=True)


def test_api_errors_are_shown_on_the_page(page, stack, settings):
    from playwright.sync_api import expect

    page.goto(stack.serve_url + "/")
    # A query over the configured length limit: the API's 422 message appears on the page.
    too_long = settings.serve.max_query_chars + 1
    page.evaluate("(n) => { document.querySelector('#query').value = 'x'.repeat(n); }", too_long)
    page.click("#search-button")
    expect(page.locator("#search-error")).to_contain_text(f"query is {too_long} characters long")
