"""The studio in a real browser: upload, launch a job from the generated form, watch it live, try it.

Real Chromium (Debian's package, driven by Playwright), a real studio (uvicorn + a Celery worker on the
embedded SQLite broker) and real training of LoRA on the bundled MiniLM with 100 rows of SST-2.
"""

import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CHROMIUM_ARGS
from tests.studio import PROJECT_ROOT, run_studio, sst2_slice

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

TRAINING_TIMEOUT_MS = 600_000
SCREENSHOT = PROJECT_ROOT / "docs" / "screenshot.png"

# Records, the first time the job page counts a chart point, what the status badge said at that moment.
RECORD_FIRST_POINT = """
document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("job-live");
  if (!root) return;
  new MutationObserver(() => {
    if (window.__firstPoint === undefined && Number(root.dataset.points) > 0) {
      window.__firstPoint = {points: Number(root.dataset.points),
                             status: document.getElementById("job-status").textContent.trim()};
    }
  }).observe(root, {attributes: true, attributeFilter: ["data-points"]});
});
"""


@pytest.mark.timeout(900)  # generous for a loaded machine; on an idle 2-core machine it takes about a minute
def test_upload_train_watch_download_and_try_out(tmp_path: Path, chromium_path: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    csv_path = sst2_slice(tmp_path / "sst2_100.csv", 100)
    bad_path = tmp_path / "notes.docx"
    bad_path.write_text("not a dataset\n", encoding="utf-8")

    with run_studio(tmp_path / "data") as studio, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
            context.add_init_script(RECORD_FIRST_POINT)
            context.set_default_timeout(30_000)
            page = context.new_page()

            # given: the dashboard of an empty studio offers the demo dataset
            studio.open_page(page, "/")
            expect(page.get_by_test_id("load-demo")).to_be_visible()

            # when: a file of the wrong type is uploaded, the service's 4xx shows in the form
            studio.open_page(page, "/datasets")
            page.set_input_files("#upload-file", str(bad_path))
            page.get_by_test_id("upload-submit").click()
            expect(page.get_by_test_id("upload-result")).to_contain_text("Unsupported file type")

            # when: 100 rows of SST-2 are uploaded through the form, the profile page opens
            page.set_input_files("#upload-file", str(csv_path))
            page.fill("#upload-name", "SST-2 (100 rows)")
            page.get_by_test_id("upload-submit").click()
            page.wait_for_url(re.compile(r"/datasets/\d+$"))
            expect(page.get_by_test_id("dataset-rows")).to_have_text("100")
            expect(page.get_by_test_id("label-counts")).to_be_visible()

            # when: a small job is launched through the generated form
            page.get_by_test_id("train-on-this").click()
            page.wait_for_url(re.compile(r"/jobs/new\?dataset_id=\d+$"))
            with page.expect_response(lambda response: "/jobs/new/method?method=lora" in response.url):
                page.select_option("#f-method", "lora")  # htmx swaps in the method's own fields
            # the method's rank is in the form's basic part, its other settings in the folded advanced part
            expect(page.locator("#method-basic [name='method_config.r']")).to_be_visible()
            expect(page.locator("#section-method [name='method_config.alpha']")).to_be_attached()
            page.get_by_test_id("advanced").locator("summary").click()
            page.fill("#f-name", "browser test")
            page.fill("#f-training-num-epochs", "3")
            page.fill("#f-training-batch-size", "16")
            page.fill("#f-training-max-length", "64")
            page.fill("#f-training-logging-steps", "2")
            page.fill("#f-training-learning-rate", "0.002")
            page.get_by_test_id("launch-job").click()
            page.wait_for_url(re.compile(r"/jobs/\d+$"))
            live = page.locator("#job-live")

            # then: chart points arrive while the job runs, and then it succeeds
            page.wait_for_function("() => window.__firstPoint !== undefined", timeout=TRAINING_TIMEOUT_MS)
            first_point = page.evaluate("window.__firstPoint")
            assert first_point["points"] > 0
            assert first_point["status"] in ("queued", "running"), first_point
            expect(page.get_by_test_id("job-status")).to_have_text("succeeded", timeout=TRAINING_TIMEOUT_MS)
            expect(page.get_by_test_id("adapter-link")).to_be_visible()
            page.wait_for_function("() => document.getElementById('job-live').dataset.streamEnded === 'true'")
            points = int(live.get_attribute("data-points") or 0)
            # 18 steps (90 training rows, batch 16, 3 epochs) logged every 2, plus the evaluations
            assert points >= 9 + 3, points
            expect(page.get_by_test_id("job-events")).to_contain_text("succeeded")
            page.wait_for_timeout(300)  # the charts redraw on a 100 ms timer
            shot = tmp_path / "job.png"
            page.screenshot(path=str(shot))
            if os.environ.get("UPDATE_SCREENSHOT") == "1" or not SCREENSHOT.exists():
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, SCREENSHOT)

            # then: the adapter downloads as a zip that peft can load
            with page.expect_download() as download_info:
                page.get_by_test_id("adapter-download").click()
            archive = tmp_path / "adapter.zip"
            download_info.value.save_as(archive)
            with zipfile.ZipFile(archive) as zipped:
                assert "adapter_config.json" in zipped.namelist()

            # then: the try-out page predicts a label with a probability per class
            page.get_by_test_id("adapter-link").click()
            page.wait_for_url(re.compile(r"/adapters/\d+$"))
            page.get_by_test_id("predict-text").fill("a gripping , beautifully acted and deeply moving film")
            page.get_by_test_id("predict-submit").click()
            expect(page.get_by_test_id("predicted-label")).to_have_text(
                re.compile(r"^[01]$"), timeout=180_000
            )
            shares = page.locator("[data-testid=probabilities] .probability").all_inner_texts()
            assert len(shares) == 2
            assert abs(sum(float(share.rstrip("%")) for share in shares) - 100) < 0.5
        except Exception as exc:
            exc.add_note(f"--- end of the studio's log ---\n{studio.log()[-6000:]}")
            raise
        finally:
            browser.close()
