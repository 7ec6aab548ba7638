"""The Models page in Chromium: the task filter, a Hub download started from the page whose progress bar
fills live (htmx refresh) until the model joins the library, the admin's delete, and the Hugging Face token
saved on the account page; the job form's models for the task and the model's own chat template."""

from pathlib import Path

from tests import lm
from tests.conftest import CHROMIUM_ARGS
from tests.hub_server import run_hub
from tests.studio import run_studio

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module


def test_download_from_the_models_page_shows_progress_and_lists_the_model(
    tmp_path: Path, chromium_path: str, tiny_lm: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with run_hub() as hub:
        hub.add_folder("acme/tiny-chat", tiny_lm)
        hub.throttle = (tiny_lm / "model.safetensors").stat().st_size / 4  # a few seconds of progress
        with (
            run_studio(
                tmp_path / "data",
                HF_ENDPOINT=hub.url,
                HF_HUB_CACHE=str(tmp_path / "hub-cache"),
                PEFT_STUDIO_HUB_DOWNLOADS="true",
            ) as studio,
            sync_playwright() as playwright,
        ):
            browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(120_000)
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                # given the library with only the bundled model, and the recommended starting points
                studio.open_page(page, "/models")
                expect(page.get_by_test_id("models-table")).to_contain_text("bundled/all-MiniLM-L6-v2")
                expect(page.get_by_test_id("recommended")).to_contain_text("Qwen/Qwen2.5-0.5B-Instruct")
                # when a download is started from the form
                page.get_by_test_id("download-form").locator("input[name=model_id]").fill("acme/tiny-chat")
                page.get_by_test_id("download-form").locator("button[type=submit]").click()
                # then the table shows it running with a partly filled bar, then succeeded
                row = page.locator("[data-download]").first
                expect(row).to_contain_text("running")
                # the throttled download takes seconds more than expect's 5 s default: wait for it, time nothing
                expect(row).to_contain_text("succeeded", timeout=120_000)
                files = len(list(tiny_lm.iterdir()))
                expect(row).to_contain_text(f"{files} / {files} files")
                # and after a reload the library lists it for causal LM, not for classification
                page.goto(f"{studio.url}/models?task=causal-lm")
                expect(page.locator('[data-model="acme/tiny-chat"]')).to_contain_text("LlamaForCausalLM")
                page.get_by_label("Task").select_option("sequence-classification")
                expect(page.locator('[data-model="bundled/all-MiniLM-L6-v2"]')).to_be_visible()
                expect(page.locator('[data-model="acme/tiny-chat"]')).to_have_count(0)
                # when the admin deletes it
                page.goto(f"{studio.url}/models")
                page.once("dialog", lambda dialog: dialog.accept())
                page.locator('[data-model="acme/tiny-chat"] button').click()
                # then it is gone
                expect(page.locator('[data-model="acme/tiny-chat"]')).to_have_count(0)
                # when a token for gated models is saved on the account page the Models page points to
                page.get_by_test_id("hub-token-link").get_by_role("link").click()
                expect(page.get_by_test_id("hub-token-state")).to_have_text("No token saved.")
                page.locator("#hub-token-input").fill("hf_browser_token_789")
                page.get_by_test_id("hub-token-form").locator("button[type=submit]").click()
                # then it is saved and never shown again
                expect(page.get_by_test_id("hub-token-state")).to_contain_text("A token is saved")
                expect(page.locator("#hub-token-input")).to_have_value("")
                assert "hf_browser_token_789" not in page.content()
                assert not errors, errors
            finally:
                browser.close()


def test_the_job_form_offers_the_library_models_of_the_chosen_task_and_proposes_their_chat_template(
    tmp_path: Path, chromium_path: str, tiny_lm: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.test_models_library import put_in_hub_cache

    # given a Hub cache holding a causal LM
    cache = tmp_path / "hub-cache"
    put_in_hub_cache(cache, "acme/tiny-chat", tiny_lm)
    with (
        run_studio(tmp_path / "data", HF_HUB_CACHE=str(cache)) as studio,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            studio.open_page(page, "/jobs/new")
            options = page.locator("#f-base-model-options option")
            # then classification offers the bundled encoder, not the causal LM
            expect(
                page.locator('#f-base-model-options option[value="bundled/all-MiniLM-L6-v2"]')
            ).to_have_count(1)
            expect(page.locator('#f-base-model-options option[value="acme/tiny-chat"]')).to_have_count(0)
            # when the task becomes causal LM
            page.locator("#f-task").select_option("causal-lm")
            # then the causal LM is offered and replaces the encoder, which no longer suits
            expect(page.locator('#f-base-model-options option[value="acme/tiny-chat"]')).to_have_count(1)
            expect(
                page.locator('#f-base-model-options option[value="bundled/all-MiniLM-L6-v2"]')
            ).to_have_count(0)
            assert options.count() >= 1
            expect(page.locator("#f-base-model")).not_to_have_value("bundled/all-MiniLM-L6-v2")
            # when the Hub model is picked, the chat template proposed is the model's own, which it has
            page.locator("#f-base-model").fill("acme/tiny-chat")
            expect(page.get_by_test_id("template-proposal")).to_have_text(
                "acme/tiny-chat has its own chat template: proposed."
            )
            template = page.locator("#f-causal-lm-template")
            expect(template).to_have_value("auto")
            expect(template.locator("option:checked")).to_have_text("the model's own")
        finally:
            browser.close()
