"""Take the issue-19 screenshots (job form, job page, compare page) from a real studio: ``python -m scripts.screenshots PREFIX``.

Starts ``peft-studio serve`` with tests/studio.py, uploads 120 rows of SST-2, trains two small LoRA jobs and
photographs the pages at 1366x900 into docs/screenshots/PREFIX-*.png (``after`` also refreshes the README's
docs/screenshot.png).
"""

import sys
import tempfile
from pathlib import Path

from tests.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.studio import PROJECT_ROOT, run_studio, sst2_slice, wait_for_job

OUT = PROJECT_ROOT / "docs" / "screenshots"


def main(prefix: str) -> None:
    """Train two jobs and save the three screenshots named ``prefix-form.png``, ``-job.png`` and ``-compare.png``."""
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_studio(Path(tmp) / "data") as studio,
        studio.client() as api,
    ):
        csv_path = sst2_slice(Path(tmp) / "sst2.csv", 120)
        dataset = api.post(
            "/api/v1/datasets", files={"file": (csv_path.name, csv_path.read_bytes(), "text/csv")}
        ).json()
        ids = []
        for rate, rank in ((0.002, 8), (0.0005, 4)):
            spec = {
                "dataset_id": dataset["id"],
                "name": f"LoRA r={rank}",
                "method": "lora",
                "method_config": {"r": rank},
                "training": {
                    "num_epochs": 2,
                    "batch_size": 16,
                    "learning_rate": rate,
                    "logging_steps": 2,
                    "max_length": 64,
                },
            }
            ids.append(api.post("/api/v1/jobs", json=spec).json()["id"])
        for job_id in ids:
            wait_for_job(api, job_id, timeout=900)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            studio.open_page(page, f"/jobs/new?dataset_id={dataset['id']}")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT / f"{prefix}-form.png"), full_page=False)
            page.goto(f"{studio.url}/jobs/{ids[0]}")
            page.wait_for_timeout(3000)
            page.screenshot(path=str(OUT / f"{prefix}-job.png"), full_page=True)
            if prefix == "after":  # the README's picture: the top of the job page at 1280x1000
                page.set_viewport_size({"width": 1280, "height": 1000})
                page.reload()
                page.wait_for_timeout(3000)
                page.screenshot(path=str(PROJECT_ROOT / "docs" / "screenshot.png"))
                page.set_viewport_size({"width": 1366, "height": 900})
            page.goto(f"{studio.url}/compare?jobs={ids[0]},{ids[1]}")
            page.wait_for_timeout(3000)
            page.screenshot(path=str(OUT / f"{prefix}-compare.png"), full_page=True)
            browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "after")
