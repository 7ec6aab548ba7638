"""Causal LM end to end: a real studio (uvicorn + a Celery worker), the Alpaca demo file, the tiny Llama.

The job goes in through the JSON API and through the HTML job form, trains on the worker, streams eval
perplexity and token accuracy, merges into a downloadable model, and in real Chromium the try-out page shows
the adapter's answer arriving token by token beside the base model's.
"""

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import lm
from tests.conftest import CHROMIUM_ARGS
from tests.lm import ALPACA_DEMO
from tests.sse import read_events
from tests.studio import RunningStudio, run_studio, wait_for_job

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module


# Counts how often the adapter's answer changes while it streams, and whether it was done at the time.
COUNT_UPDATES = """
(() => {
  const output = document.querySelector('[data-testid="output-adapter"]');
  window.__updates = [];
  new MutationObserver(() => window.__updates.push({length: output.textContent.length,
                                                    done: output.dataset.done === "true"}))
    .observe(output, {childList: true, characterData: true, subtree: true, attributes: true});
})();
"""


def _metric_events(studio: RunningStudio, job_id: int) -> list[dict[str, Any]]:
    url = f"{studio.url}/api/v1/jobs/{job_id}/stream"
    with httpx.stream("GET", url, headers=studio.headers, timeout=600) as response:
        assert response.status_code == 200
        points = []
        for event in read_events(response):
            if event.event == "metric":
                points.append(json.loads(event.data))
            elif event.event == "end":
                break
    return points


@pytest.mark.timeout(900)  # generous for a loaded machine; about a minute on an idle 2-core machine
def test_alpaca_job_trains_on_the_worker_then_tokens_stream_into_the_try_out_page(
    tmp_path: Path, chromium_path: str, tiny_lm: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with (
        run_studio(tmp_path / "data", PEFT_STUDIO_TORCH_THREADS="1") as studio,
        studio.client(timeout=120) as client,
    ):
        # given the Alpaca demo file uploaded through the API
        upload = client.post(
            "/api/v1/datasets",
            files={"file": ("alpaca_en_demo.json", ALPACA_DEMO.read_bytes(), "application/json")},
        )
        assert upload.status_code == 201, upload.text
        dataset = upload.json()
        assert dataset["row_count"] == 999
        spec = {
            "task": "causal-lm",
            "base_model": str(tiny_lm),
            "dataset_id": dataset["id"],
            "validation_fraction": 0.02,
            "method_config": {"r": 16, "alpha": 32},
            "training": {
                "max_steps": 20,
                "batch_size": 8,
                "learning_rate": 0.01,
                "max_length": 128,
                "logging_steps": 5,
                "eval_steps": 10,
            },
        }

        # when its training data is previewed, the prompt is masked and the response is not
        preview = client.post("/api/v1/jobs/preview?count=1", json=spec)
        assert preview.status_code == 200, preview.text
        assert [span["masked"] for span in preview.json()["examples"][0]["spans"]][:2] == [True, False]

        # when a job is created through the API and one through the HTML form
        created = client.post("/api/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        form = {
            "name": "alpaca from the form",
            "task": "causal-lm",
            "base_model": str(tiny_lm),
            "dataset_id": str(dataset["id"]),
            "method": "lora",
            "validation_fraction": "0.02",
            "causal_lm.format": "alpaca",
            "causal_lm.template": "alpaca",
            "training.max_steps": "2",
            "training.batch_size": "4",
            "training.max_length": "192",
        }
        submitted = client.post("/jobs/new", data=form, follow_redirects=False)
        assert submitted.status_code == 303, submitted.text[-2000:]
        form_job_id = int(submitted.headers["location"].rsplit("/", 1)[-1])

        # then the worker trains it and the live stream carries eval loss, perplexity and token accuracy
        points = _metric_events(studio, job_id)
        job = wait_for_job(client, job_id, timeout=600)
        assert job["status"] == "succeeded", (job["error"], studio.log()[-3000:])
        evals = [point["values"] for point in points if point["split"] == "eval"]
        assert len(evals) == 2 and {"loss", "perplexity", "token_accuracy"} <= set(evals[-1])
        adapter_id = job["adapter_id"]
        form_job = wait_for_job(client, form_job_id, timeout=600)
        assert form_job["status"] == "succeeded", form_job["error"]
        assert form_job["spec"]["causal_lm"]["template"] == "alpaca"

        # and the merged model downloads as a plain transformers folder
        merged = client.get(f"/api/v1/adapters/{adapter_id}/merged")
        assert merged.status_code == 200, merged.text
        names = zipfile.ZipFile(io.BytesIO(merged.content)).namelist()
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(120_000)

                # when a prompt is sent from the try-out page
                studio.open_page(page, f"/adapters/{adapter_id}/generate")
                page.get_by_test_id("generate-prompt").fill("Give three tips for staying healthy.")
                page.fill("#generate-max-new-tokens", "48")
                page.evaluate(COUNT_UPDATES)
                page.get_by_test_id("generate-submit").click()

                # then the adapter's answer appears piece by piece, and the base model's beside it
                adapter_output = page.get_by_test_id("output-adapter")
                expect(adapter_output).to_have_attribute("data-done", "true")
                expect(page.get_by_test_id("output-base")).to_have_attribute("data-done", "true")
                updates = page.evaluate("window.__updates")
                growing = [u["length"] for u in updates if not u["done"] and u["length"] > 0]
                assert len(set(growing)) > 1, updates  # text grew several times before the stream was done
                assert adapter_output.text_content()
                expect(page.locator('[data-status="adapter"]')).to_contain_text(re.compile(r"\d+ tokens"))
            finally:
                browser.close()
