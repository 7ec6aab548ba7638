"""The chat playground (issue 19) in real Chromium: a multi-turn conversation with a tiny causal-LM adapter and
its base model side by side, streamed from /v1/chat/completions, with a system prompt and sampling settings."""

import json
from pathlib import Path
from typing import Any

import pytest

from tests import lm
from tests.conftest import CHROMIUM_ARGS
from tests.lm import ALPACA_DEMO
from tests.studio import run_studio, wait_for_job

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module

# Counts the changes of the adapter's streamed answers while they arrive (more than one: it streamed).
COUNT_UPDATES = """
(() => {
  window.__chatUpdates = 0;
  const log = document.querySelector('[data-testid="chat-log-adapter"]');
  new MutationObserver(() => { window.__chatUpdates += 1; })
    .observe(log, {childList: true, characterData: true, subtree: true});
})();
"""


@pytest.mark.timeout(900)  # one small causal-LM job on a loaded machine
def test_chat_playground_streams_a_multi_turn_conversation(
    tmp_path: Path, chromium_path: str, tiny_lm: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with (
        run_studio(tmp_path / "data", PEFT_STUDIO_TORCH_THREADS="1") as studio,
        studio.client(timeout=120) as client,
    ):
        # given: a causal-LM adapter of the tiny Llama
        files = {"file": ("alpaca.json", ALPACA_DEMO.read_bytes(), "application/json")}
        dataset = client.post("/api/v1/datasets", files=files).json()
        spec = {
            "task": "causal-lm",
            "base_model": str(tiny_lm),
            "dataset_id": dataset["id"],
            "validation_fraction": 0.02,
            "training": {"max_steps": 4, "batch_size": 4, "max_length": 96, "logging_steps": 2},
        }
        job_id = client.post("/api/v1/jobs", json=spec).json()["id"]
        job = wait_for_job(client, job_id, timeout=600)
        assert job["status"] == "succeeded", (job["error"], studio.log()[-3000:])
        adapter_id = job["adapter_id"]

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 900})
                page.set_default_timeout(120_000)
                sent: list[dict[str, Any]] = []
                page.on(
                    "request",
                    lambda request: (
                        sent.append(json.loads(request.post_data or "{}"))
                        if request.url.endswith("/v1/chat/completions")
                        else None
                    ),
                )
                errors: list[str] = []
                page.on("pageerror", lambda error: errors.append(str(error)))

                # when: the adapter page's chat link opens the playground
                studio.open_page(page, f"/adapters/{adapter_id}")
                expect(page.get_by_test_id("merged-download")).to_be_visible(timeout=60_000)
                page.get_by_test_id("chat-link").click()
                expect(page.get_by_test_id("chat-playground")).to_be_visible(timeout=60_000)
                page.evaluate(COUNT_UPDATES)

                # when: a system prompt, sampling settings and a first message are sent
                page.get_by_test_id("chat-system").fill("You are a helpful assistant.")
                page.fill("#chat-temperature", "0.8")
                page.fill("#chat-top-p", "0.9")
                page.fill("#chat-max-tokens", "16")
                page.get_by_test_id("chat-message").fill("Give three tips for staying healthy.")
                page.get_by_test_id("chat-send").click()
                base_answer = page.locator('[data-testid="chat-log-base"] [data-done="true"]')
                expect(base_answer).to_have_count(1, timeout=300_000)

                # then: both sides answered, the adapter's answer arrived in pieces
                adapter_answers = page.locator('[data-testid="chat-log-adapter"] .chat-assistant')
                expect(adapter_answers).to_have_count(1)
                assert page.evaluate("window.__chatUpdates") > 2
                assert errors == []

                # when: a second message follows
                page.get_by_test_id("chat-message").fill("And one more?")
                page.get_by_test_id("chat-send").click()
                expect(base_answer).to_have_count(2, timeout=300_000)

                # then: each side was sent its own conversation so far, with the system prompt and the settings
                assert [body["model"] for body in sent] == [
                    f"ft:{tiny_lm.name}:ftjob-{job_id}",
                    str(tiny_lm),
                ] * 2
                second = sent[2]
                assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
                assert second["messages"][0]["content"] == "You are a helpful assistant."
                assert (
                    second["messages"][2]["content"]
                    == adapter_answers.first.locator(".chat-text").text_content()
                )
                assert (second["temperature"], second["top_p"], second["max_tokens"]) == (0.8, 0.9, 16)
                assert second["stream"] is True
                assert errors == []
            finally:
                browser.close()
