"""Pages a newcomer reads at a glance (issue 19), in real Chromium against a real studio: the API docs work
offline, and no signed-in page logs a console error or scrolls sideways at 1024 px."""

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHROMIUM_ARGS
from tests.studio import run_studio

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# How far a page's content may exceed the window before it counts as overflowing (sub-pixel rounding).
OVERFLOW_SLACK_PX = 1


def _watch_console(page: Any) -> list[str]:
    """Collects console errors and uncaught exceptions of ``page`` (and of every page it navigates to)."""
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return problems


@pytest.mark.timeout(600)
def test_api_docs_render_offline_from_static_assets(tmp_path: Path, chromium_path: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with run_studio(tmp_path / "data") as studio, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 900})
            # given: a browser that can reach the studio and nothing else (no CDN)
            outside: list[str] = []

            def only_the_studio(route: Any) -> None:
                if route.request.url.startswith(studio.url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            context.route("**/*", only_the_studio)
            page = context.new_page()
            problems = _watch_console(page)
            # when: /docs opens
            studio.open_page(page, "/docs")
            # then: Swagger UI is defined and lists the API's operations, with nothing fetched from outside
            expect(page.locator(".opblock").first).to_be_visible(timeout=60_000)
            assert page.evaluate("typeof SwaggerUIBundle") == "function"
            expect(page.locator(".opblock-summary-path", has_text="/api/v1/jobs").first).to_be_visible()
            assert outside == []
            assert problems == []
        finally:
            browser.close()
