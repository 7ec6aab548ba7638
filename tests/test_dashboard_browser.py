"""The dashboard in a real browser: a 2×2 sweep trains on a real studio, its page overlays the four jobs'
curves as they fill in, and a job page shows exactly the values the trainer logged.

Real Chromium (Debian's package, driven by Playwright), a real studio (uvicorn + a Celery worker) and real
training (LoRA and IA3 on the bundled MiniLM, 3 steps each on 48 rows of SST-2).
"""

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CHROMIUM_ARGS
from tests.studio import run_studio, sst2_slice, wait_for_job

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

TIMEOUT_MS = 600_000


def _latest_points(points: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of every "split.metric" of a job's points, as the job page shows them."""
    latest: dict[str, float] = {}
    for point in points:
        for name, value in point["values"].items():
            latest[f"{point['split']}.{name}"] = value
    return latest


@pytest.mark.timeout(1200)
def test_a_sweep_page_overlays_its_jobs_and_a_job_page_shows_the_logged_values(
    tmp_path: Path, chromium_path: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    csv_path = sst2_slice(tmp_path / "sst2_64.csv", 64)
    with run_studio(tmp_path / "data") as studio, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            api = studio.client()
            with csv_path.open("rb") as handle:
                dataset = api.post("/api/v1/datasets", files={"file": ("sst2_64.csv", handle)}).json()

            # given: a 2×2 sweep (method × learning rate), queued through the API
            sweep = api.post(
                "/api/v1/sweeps",
                json={
                    "name": "browser sweep",
                    "base": {
                        "dataset_id": dataset["id"],
                        "validation_fraction": 0.25,
                        "training": {
                            "max_steps": 3,
                            "batch_size": 8,
                            "max_length": 32,
                            "logging_steps": 1,
                            "eval_steps": 3,
                        },
                    },
                    "grid": {"method": ["lora", "ia3"], "training.learning_rate": [0.001, 0.002]},
                },
            )
            assert sweep.status_code == 201, sweep.text
            sweep_body = sweep.json()
            job_ids = sweep_body["job_ids"]
            assert len(job_ids) == 4

            # when: its page is open while the jobs train
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            context.set_default_timeout(30_000)
            page = context.new_page()
            studio.open_page(page, f"/sweeps/{sweep_body['id']}")
            expect(page.get_by_test_id("sweep-name")).to_have_text("browser sweep")
            for job_id in job_ids:
                finished = wait_for_job(api, job_id, timeout=TIMEOUT_MS / 1000)
                assert finished["status"] == "succeeded", finished

            # then: the page stops polling once every job is done, with one line per job in each chart
            page.wait_for_function(
                "() => document.getElementById('compare').dataset.live === 'false'", timeout=60_000
            )
            loss_chart = page.locator("[data-testid=compare-chart][data-key='train.loss']")
            expect(loss_chart).to_have_attribute("data-series-count", "4")
            assert int(loss_chart.get_attribute("data-point-count") or 0) == 4 * 3
            expect(loss_chart.locator(".u-legend .u-series")).to_have_count(5)  # x plus one line per job
            eval_chart = page.locator("[data-testid=compare-chart][data-key='eval.accuracy']")
            expect(eval_chart).to_have_attribute("data-series-count", "4")
            # the summary refreshes by itself until every job reads succeeded
            expect(page.get_by_test_id("summary-status").filter(has_text="succeeded")).to_have_count(
                4, timeout=30_000
            )
            diff_fields = page.locator("[data-testid=config-diff] tr[data-field]").evaluate_all(
                "rows => rows.map(r => r.dataset.field)"
            )
            assert "method" in diff_fields and "training.learning_rate" in diff_fields
            assert not any(field.startswith(("training.max_steps", "dataset_id")) for field in diff_fields)
            page.screenshot(path=str(tmp_path / "sweep.png"))

            # when: one job's page is opened after it finished (its history comes from /series)
            job_id = job_ids[0]
            studio.open_page(page, f"/jobs/{job_id}")
            page.wait_for_function("() => document.getElementById('job-live').dataset.streamEnded === 'true'")
            page.wait_for_timeout(300)  # the charts redraw on a 100 ms timer

            # then: every value shown is exactly the last one the trainer logged
            logged = _latest_points(api.get(f"/api/v1/jobs/{job_id}/metrics").json())
            shown = page.locator("[data-metric][data-value]").evaluate_all(
                "cells => Object.fromEntries(cells.map(c => [c.dataset.metric, Number(c.dataset.value)]))"
            )
            shown.pop("epoch", None)
            expected = {
                key: value
                for key, value in logged.items()
                if key in shown
                or key
                in (
                    "train.loss",
                    "eval.loss",
                    "eval.accuracy",
                    "eval.f1_macro",
                    "train.learning_rate",
                    "train.grad_norm",
                    "train.tokens_per_second",
                    "train.peak_rss_mb",
                )
            }
            assert {"train.loss", "eval.loss", "eval.accuracy", "train.peak_rss_mb"} <= set(shown)
            assert shown == expected
            points = api.get(f"/api/v1/jobs/{job_id}/metrics").json()
            assert page.get_by_test_id("chart-points").inner_text() == str(len(points))
            for chart in (
                "chart-loss",
                "chart-eval",
                "chart-lr",
                "chart-grad",
                "chart-memory",
                "chart-tokens",
            ):
                expect(page.get_by_test_id(chart)).to_be_visible()
            expect(page.get_by_test_id("chart-perplexity")).to_be_hidden()  # a causal-LM metric
            # and a CPU job's memory chart names only what it logged: no empty "CUDA allocated" entry
            memory_legend = page.get_by_test_id("chart-memory").locator(".u-legend .u-series")
            expect(memory_legend.filter(has_text="process RSS")).to_be_visible()
            expect(memory_legend.filter(has_text="CUDA allocated")).to_be_hidden()
            expect(page.get_by_test_id("confusion-matrix")).to_be_visible()
            with page.expect_download() as download:
                page.get_by_test_id("metrics-csv").click()
            lines = Path(download.value.path()).read_text().splitlines()
            assert len(lines) == 1 + len(points)
        except Exception as exc:
            exc.add_note(f"--- end of the studio's log ---\n{studio.log()[-6000:]}")
            raise
        finally:
            browser.close()
