"""Preference tuning in a real browser (Chromium, a studio without a worker): the job form offers the preference
task with its loss settings, preselected from an uploaded DPO file, and the training-data preview shows the prompt
masked and the chosen and rejected answers side by side."""

import re
from pathlib import Path

import pytest

from tests import lm
from tests.conftest import CHROMIUM_ARGS
from tests.studio import PROJECT_ROOT, run_studio

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

tiny_lm = lm.tiny_lm
SCREENSHOT = PROJECT_ROOT / "docs" / "screenshots" / "preference-preview.png"
WAIT = 120_000  # a loaded machine: generous waits, no timing asserted


@pytest.mark.timeout(600)
def test_the_form_offers_preference_tuning_and_previews_chosen_beside_rejected(
    tmp_path: Path, chromium_path: str, tiny_lm: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.studio import SHARED_DATA

    demo = SHARED_DATA / "preference" / "dpo_en_demo.json"
    with (
        run_studio(tmp_path / "data", workers=0) as studio,
        studio.client() as client,
        sync_playwright() as playwright,
    ):
        # given the DPO demo (ShareGPT conversations with chosen and rejected answers) uploaded
        upload = client.post("/api/v1/datasets", files={"file": ("dpo_en_demo.json", demo.read_bytes())})
        assert upload.status_code == 201, upload.text
        dataset_id = upload.json()["id"]
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
            page.set_default_timeout(WAIT)
            # when the job form opens on it
            studio.open_page(page, f"/jobs/new?dataset_id={dataset_id}")
            # then the preference task is chosen, its section shows the loss and its settings, causal LM's hides
            expect(page.locator("#f-task")).to_have_value("preference")
            options = page.locator("#f-preference-loss option").all_inner_texts()
            assert [o.strip().lower() for o in options] == ["dpo", "ipo", "orpo", "simpo", "kto"], options
            for dom_id in (
                "f-preference-beta",
                "f-preference-simpo-gamma",
                "f-preference-continue-from-adapter-id",
            ):
                expect(page.locator(f"#{dom_id}")).to_be_visible()
            expect(page.locator("#f-preference-prompt-column")).to_have_value("conversations")
            expect(page.locator("#f-causal-lm-format")).to_be_hidden()
            page.locator("#f-preference-loss").select_option("simpo")

            # when the tiny model is the base and the preview is asked for
            page.locator("#f-base-model").fill(str(tiny_lm))
            page.locator("#f-training-max-length").fill("96")
            page.get_by_test_id("preview-examples").click()
            # then the prompt is masked and the two answers sit side by side, cut where max length ends
            chosen = page.get_by_test_id("preview-chosen").first
            rejected = page.get_by_test_id("preview-rejected").first
            expect(page.locator("#preview")).not_to_be_empty(timeout=WAIT)
            assert page.locator("#preview .error").count() == 0, page.locator("#preview").inner_text()
            expect(chosen).to_be_visible(timeout=WAIT)
            expect(rejected).to_be_visible()
            expect(page.get_by_test_id("preview-loss")).to_have_text("simpo")
            expect(page.get_by_test_id("preview-prompt").first).to_contain_text("<|im_start|>assistant")
            left, right = chosen.bounding_box(), rejected.bounding_box()
            assert (
                left
                and right
                and left["x"] + left["width"] <= right["x"] + 1
                and abs(left["y"] - right["y"]) < 2
            )
            expect(page.locator(".lm-preview .tok.cut").first).to_be_attached()
            page.get_by_test_id("preview-examples").scroll_into_view_if_needed()
            page.get_by_test_id("preview-example").nth(1).screenshot(path=str(SCREENSHOT))
            assert re.search(r"Row \d+", page.locator("#preview").inner_text())
        finally:
            browser.close()


@pytest.mark.timeout(600)
def test_the_sweep_form_sweeps_preference_betas_and_losses(
    tmp_path: Path, chromium_path: str, tiny_lm: Path
) -> None:
    import json

    from playwright.sync_api import expect, sync_playwright

    pairs = [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I do not know."},
        {"prompt": "Name a primary color.", "chosen": "Blue.", "rejected": "Green is not one."},
    ] * 4
    with (
        run_studio(tmp_path / "data", workers=0) as studio,
        studio.client() as client,
        sync_playwright() as playwright,
    ):
        upload = client.post("/api/v1/datasets", files={"file": ("pairs.json", json.dumps(pairs).encode())})
        assert upload.status_code == 201, upload.text
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1366, "height": 1000}).new_page()
            page.set_default_timeout(WAIT)
            # given the sweep form on the preference task over the uploaded pairs
            studio.open_page(page, "/sweeps/new")
            page.locator("#s-dataset_id").select_option(str(upload.json()["id"]))
            page.locator("#s-task").select_option("preference")
            page.locator("#s-base_model").fill(str(tiny_lm))
            page.locator("#s-max_steps").fill("2")
            page.locator("#s-max_length").fill("64")
            page.locator("#s-learning_rates").fill("5e-4")
            # when two betas and two losses are asked for and the sweep is queued
            page.locator("#s-betas").fill("0.05, 0.2")
            page.locator("#s-losses").fill("dpo, ipo")
            page.get_by_test_id("launch-sweep").click()
            # then its page lists the four jobs of the grid
            page.wait_for_url(re.compile(r"/sweeps/\d+$"), timeout=WAIT)
            sweep_id = page.url.rsplit("/", 1)[1]
            jobs = client.get(f"/api/v1/sweeps/{sweep_id}").json()["jobs"]
            combos = {(j["spec"]["preference"]["loss"], j["spec"]["preference"]["beta"]) for j in jobs}
            assert combos == {("dpo", 0.05), ("dpo", 0.2), ("ipo", 0.05), ("ipo", 0.2)}
            for job in jobs:
                expect(page.locator(f'a[href="/jobs/{job["id"]}"]').first).to_be_attached()
        finally:
            browser.close()
