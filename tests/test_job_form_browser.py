"""The job form in a real browser (Chromium, a real studio without a worker; issue 19): a short basic part with
the advanced settings folded away, human labels, presets that fill numbers from the auto rule, an Estimate
button, and Clone from a job's page filling the form with that job's settings."""

import re
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM_ARGS
from tests.studio import PROJECT_ROOT, run_studio

SCREENSHOT = PROJECT_ROOT / "docs" / "screenshots" / "job-form-after.png"
WAIT = 120_000  # a loaded machine: generous waits, no timing asserted


@pytest.mark.timeout(900)
def test_basic_form_presets_estimate_and_clone(tmp_path: Path, chromium_path: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with run_studio(tmp_path / "data", workers=0) as studio, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
            page.set_default_timeout(WAIT)

            # given: the demo dataset, and the form opened from it
            studio.open_page(page, "/")
            page.get_by_test_id("load-demo").click()
            page.wait_for_url(re.compile(r"/datasets/\d+$"))
            dataset_id = int(page.url.rsplit("/", 1)[-1])
            page.get_by_test_id("train-on-this").click()
            page.wait_for_url(re.compile(r"/jobs/new\?dataset_id=\d+$"))

            # then: the basic settings show, with human labels; the advanced ones are folded away
            for dom_id in ("f-dataset-id", "f-base-model", "f-task", "f-method", "f-training-num-epochs",
                           "f-training-learning-rate", "f-training-batch-size", "f-training-max-length",
                           "f-method-config-r"):  # fmt: skip
                expect(page.locator(f"#{dom_id}")).to_be_visible()
            expect(page.locator("label[for='f-method-config-r']")).to_have_text("Rank (r)")
            expect(page.locator("label[for='f-training-max-length']")).to_have_text("Max length (tokens)")
            for dom_id in (
                "f-training-seed",
                "f-method-config-alpha",
                "f-tracking-mlflow",
                "f-resources-gpu-class",
            ):
                expect(page.locator(f"#{dom_id}")).to_be_hidden()
            form_text = page.locator("#job-form").inner_text()
            for raw in ("Mlflow", "Gpu class", "worker/", "app/"):
                assert raw not in form_text, raw
            page.get_by_test_id("advanced").locator("summary").click()
            expect(page.locator("#f-training-seed")).to_be_visible()
            expect(page.locator("label[for='f-resources-gpu-class']")).to_have_text("GPU memory (at least)")
            page.get_by_test_id("advanced").locator("summary").click()

            # when: a preset is chosen, then: epochs and learning rate are numbers from the auto rule
            epochs = page.locator("#f-training-num-epochs")
            assert epochs.input_value() == "auto"
            chosen: dict[str, float] = {}
            for preset, title in (("quick", "Quick try"), ("balanced", "Balanced"), ("best", "Best quality")):
                page.get_by_test_id(f"preset-{preset}").click()
                note = page.get_by_test_id("preset-note")
                expect(note).to_contain_text(re.compile(rf"^{title}: .*Rule: auto settings for"))
                expect(page.locator("#f-training-num-epochs")).not_to_have_value("auto")
                chosen[preset] = float(page.locator("#f-training-num-epochs").input_value())
                assert float(page.locator("#f-training-learning-rate").input_value()) > 0
            assert chosen["quick"] < chosen["balanced"] < chosen["best"], chosen
            expect(page.locator("#f-method-config-r")).to_have_value("16")
            expect(page.locator("#f-training-early-stopping-patience")).to_have_value("3")

            # when: Estimate is pressed, then: parameters, memory and steps show before launch
            page.get_by_test_id("estimate-job").click()
            expect(page.get_by_test_id("estimate-params")).to_contain_text("%", timeout=WAIT)
            params = page.get_by_test_id("estimate-params").inner_text()
            trained, total = (int(n.replace(",", "")) for n in re.findall(r"[\d,]{4,}", params)[:2])
            assert 0 < trained < total, params
            expect(page.get_by_test_id("estimate-memory")).to_contain_text(re.compile(r"about [\d.]+ [KMG]B"))
            expect(page.get_by_test_id("estimate-steps")).to_have_text(re.compile(r"^\d[\d,]*$"))
            # no job of this model and method has finished on this studio: the time is not guessed
            expect(page.get_by_test_id("estimate-time")).to_contain_text("unknown until")
            page.wait_for_timeout(500)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # given: a job created through the API (it stays queued: no worker)
            with studio.client() as client:
                created = client.post(
                    "/api/v1/jobs",
                    json={
                        "name": "to clone",
                        "dataset_id": dataset_id,
                        "method": "lora",
                        "method_config": {"r": 12},
                        "training": {"batch_size": 8, "max_length": 96},
                    },
                )
                assert created.status_code == 201, created.text
                job_id = created.json()["id"]

            # when: Clone is pressed on its page
            studio.open_page(page, f"/jobs/{job_id}")
            expect(page.get_by_test_id("job-queue-position")).to_contain_text("1st in the queue")
            expect(page.get_by_test_id("retry-job")).to_have_count(0)
            page.get_by_test_id("clone-job").click()
            page.wait_for_url(re.compile(rf"/jobs/new\?clone={job_id}$"))

            # then: the form holds the job's settings (auto ones auto again), ready to change and launch
            expect(page.get_by_test_id("clone-notice")).to_be_visible()
            expect(page.locator("#f-name")).to_have_value("to clone (copy)")
            expect(page.locator("#f-method-config-r")).to_have_value("12")
            expect(page.locator("#f-training-batch-size")).to_have_value("8")
            expect(page.locator("#f-training-max-length")).to_have_value("96")
            expect(page.locator("#f-training-num-epochs")).to_have_value("auto")
            page.fill("#f-training-batch-size", "16")
            page.get_by_test_id("launch-job").click()
            page.wait_for_url(re.compile(r"/jobs/\d+$"))
            expect(page.get_by_test_id("job-queue-position")).to_contain_text("2nd in the queue")
            with studio.client() as client:
                spec = client.get(f"/api/v1/jobs/{page.url.rsplit('/', 1)[-1]}").json()["spec"]
            assert spec["method_config"]["r"] == 12 and spec["training"]["batch_size"] == 16
            assert spec["training"]["max_length"] == 96
        finally:
            browser.close()
