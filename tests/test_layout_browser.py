"""Pages a newcomer reads at a glance (issue 19), in real Chromium against a real studio: the API docs work
offline, and no signed-in page logs a console error or scrolls sideways at 1024 px."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHROMIUM_ARGS
from tests.studio import RunningStudio, run_studio, sst2_slice, wait_for_job

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# How far a page's content may exceed the window before it counts as overflowing (sub-pixel rounding).
OVERFLOW_SLACK_PX = 1


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStudio]:
    """One studio for the module: the docs test only reads it, so the layout test finds it as a fresh one."""
    with run_studio(tmp_path_factory.mktemp("layout") / "data") as running:
        yield running


def _watch_console(page: Any) -> list[str]:
    """Collects console errors and uncaught exceptions of ``page`` (and of every page it navigates to)."""
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return problems


@pytest.mark.timeout(600)
def test_api_docs_render_offline_from_static_assets(studio: RunningStudio, chromium_path: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
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


# Measures what scrolls sideways: the document wider than the window, and the element sticking out furthest.
OVERFLOW = """
() => {
  const width = document.documentElement.clientWidth;
  let widest = null, right = 0;
  for (const element of document.querySelectorAll("body *")) {
    const box = element.getBoundingClientRect();
    if (box.width && box.right > right && getComputedStyle(element).position !== "fixed") {
      right = box.right; widest = element.tagName + "." + element.className + "#" + element.id;
    }
  }
  return {scroll: document.documentElement.scrollWidth, width, right, widest};
}
"""


@pytest.mark.timeout(900)  # one small training job on a loaded machine
def test_no_page_logs_a_console_error_or_scrolls_sideways(
    studio: RunningStudio, tmp_path: Path, chromium_path: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with studio.client() as api, sync_playwright() as playwright:
        # given: a dataset, a finished job and its adapter
        csv_path = sst2_slice(tmp_path / "sst2.csv", 40)
        files = {"file": (csv_path.name, csv_path.read_bytes(), "text/csv")}
        dataset = api.post("/api/v1/datasets", files=files).json()
        spec = {
            "dataset_id": dataset["id"],
            "method": "lora",
            "training": {"num_epochs": 1, "batch_size": 8, "logging_steps": 1, "max_length": 32},
        }
        job_id = api.post("/api/v1/jobs", json=spec).json()["id"]
        assert wait_for_job(api, job_id, timeout=600)["status"] == "succeeded", studio.log()[-3000:]
        adapter_id = api.get("/api/v1/adapters").json()["data"][0]["id"]
        pages = [
            "/",
            "/datasets",
            f"/datasets/{dataset['id']}",
            f"/jobs/new?dataset_id={dataset['id']}",
            "/jobs",
            f"/jobs/{job_id}",
            f"/compare?jobs={job_id}",
            "/adapters",
            f"/adapters/{adapter_id}",
            "/tokens",
            "/webhooks",
            "/workers",
            "/account",
            "/models",
            "/sweeps",
        ]
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 768})
            problems = _watch_console(page)
            studio.open_page(page, "/")
            expect(page.get_by_test_id("nav-toggle")).to_be_attached(timeout=60_000)
            # when: every main page opens at 1024 px
            for path in pages:
                page.goto(f"{studio.url}{path}")
                page.wait_for_load_state("networkidle", timeout=60_000)
                # then: nothing is wider than the window, and the console stayed clean
                measured = page.evaluate(OVERFLOW)
                assert measured["scroll"] <= measured["width"] + OVERFLOW_SLACK_PX, (path, measured)
                assert problems == [], (path, problems)

            # then: at 1024 px the nav is a menu, and every link in it can be reached
            assert not page.get_by_test_id("nav-panel").is_visible()
            page.locator("label.nav-toggle-button").click()
            expect(page.get_by_test_id("nav-panel")).to_be_visible()
            page.get_by_test_id("nav-panel").get_by_role("link", name="Webhooks").click()
            page.wait_for_url(f"{studio.url}/webhooks")

            # then: at 1366 px the whole nav is one line, without the menu button
            page.set_viewport_size({"width": 1366, "height": 900})
            page.goto(f"{studio.url}/jobs/new?dataset_id={dataset['id']}")
            expect(page.get_by_test_id("logout")).to_be_visible()
            assert not page.locator("label.nav-toggle-button").is_visible()
            heights = page.evaluate(
                "[...document.querySelectorAll('.topbar nav a')].map(a => a.getBoundingClientRect().top)"
            )
            assert max(heights) - min(heights) < 4, heights  # every link on the same line
            # and none is cut off at the right
            logout = page.get_by_test_id("logout").bounding_box()
            assert logout is not None and logout["x"] + logout["width"] <= 1366

            # then: a submit of the job form (its <select name="method"> shadows form.method) logs no error
            page.get_by_test_id("launch-job").click()
            page.wait_for_load_state("networkidle", timeout=60_000)
            assert problems == []

            # then: signed out, the sign-in page shows no app nav
            signed_out = browser.new_page(viewport={"width": 1024, "height": 768})
            signed_out.goto(f"{studio.url}/login")
            expect(signed_out.get_by_test_id("login-form")).to_be_visible(timeout=60_000)
            assert signed_out.locator(".topbar nav").count() == 0
        finally:
            browser.close()
