"""Upload options, detection and the job form's column dropdowns in a real browser (Chromium, a real studio).

Files are written at test time from ../shared/data (tests/import_fixtures.py). No worker runs: nothing here
trains; the form's token-length warning and the dropdowns are answered by the web process.
"""

import re
from pathlib import Path

import pytest

from tests import import_fixtures as fixtures
from tests.conftest import CHROMIUM_ARGS
from tests.studio import run_studio


@pytest.mark.timeout(600)
def test_detection_reimport_and_column_dropdowns_in_the_browser(tmp_path: Path, chromium_path: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    news = fixtures.headerless_news(tmp_path / "news.csv", 200)
    sentences = fixtures.tab_txt(tmp_path / "sentences.txt", 200, stray_quote_row=19)
    chat = fixtures.chat_jsonl(tmp_path / "chat.jsonl", 30)

    with run_studio(tmp_path / "data", workers=0) as studio, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            page.set_default_timeout(30_000)

            # given: a headerless tab-separated .txt uploaded with every option on auto
            studio.open_page(page, "/datasets")
            page.set_input_files("#upload-file", str(sentences))
            page.get_by_test_id("upload-submit").click()
            page.wait_for_url(re.compile(r"/datasets/\d+$"))

            # then: the page says what was detected
            expect(page.get_by_test_id("import-delimiter")).to_have_text("tab")
            expect(page.get_by_test_id("import-header")).to_contain_text("no")
            expect(page.get_by_test_id("dataset-rows")).to_have_text("200")
            expect(page.get_by_test_id("import-note").first).to_contain_text("do not pair up")

            # when: re-imported from the page with names for the two columns
            page.locator("summary", has_text="Re-import with other options").click()
            page.fill("#reimport-column-names", "sentence, label")
            page.get_by_test_id("reimport-submit").click()

            # then: the profile shows the new names and the proposal uses them
            expect(page.get_by_test_id("preview").locator("th").first).to_have_text("sentence")
            expect(page.get_by_test_id("import-proposal")).to_contain_text("sequence-classification")

            # when: a headerless CSV is uploaded with the header option set explicitly in the form
            studio.open_page(page, "/datasets")
            page.locator("summary", has_text="Import options").click()
            page.select_option("#upload-header", "no")
            page.fill("#upload-column-names", "class, title, description")
            page.set_input_files("#upload-file", str(news))
            page.get_by_test_id("upload-submit").click()
            page.wait_for_url(re.compile(r"/datasets/\d+$"))
            expect(page.get_by_test_id("preview").locator("th")).to_have_text(
                ["class", "title", "description"]
            )
            news_id = page.url.rsplit("/", 1)[-1]

            # and a chat JSONL
            studio.open_page(page, "/datasets")
            page.set_input_files("#upload-file", str(chat))
            page.get_by_test_id("upload-submit").click()
            page.wait_for_url(re.compile(r"/datasets/\d+$"))
            chat_id = page.url.rsplit("/", 1)[-1]

            # when: the job form opens from the news dataset
            studio.open_page(page, f"/jobs/new?dataset_id={news_id}")

            # then: the label and text fields are dropdowns of its columns, the proposal chosen
            label = page.locator("#f-label-column")
            expect(label.locator("option")).to_have_count(3)
            expect(label).to_have_value("class")
            expect(page.locator("#f-text-columns option:checked")).to_have_text(
                [re.compile("^title"), re.compile("^description")]
            )
            expect(page.get_by_test_id("recommended-max-length")).to_be_visible()

            # when: a very short max length is typed, the form warns before launch
            advanced = page.locator("details#advanced")
            if advanced.count():  # the form may fold training settings away
                advanced.evaluate("element => { element.open = true; }")
            page.fill("#f-training-max-length", "8")
            page.locator("#f-training-max-length").dispatch_event("change")
            expect(page.get_by_test_id("truncation-warning")).to_contain_text("would be truncated")

            # when: the chat dataset is chosen, its columns and the causal-LM chat proposal are swapped in
            page.select_option("#f-dataset-id", chat_id)
            expect(page.locator("#f-task")).to_have_value("causal-lm")
            expect(page.locator("#f-causal-lm-format")).to_have_value("chat")
            expect(page.locator("#f-causal-lm-messages-column")).to_have_value("messages")
            expect(page.locator("#section-causal_lm")).to_be_visible()
        finally:
            browser.close()
