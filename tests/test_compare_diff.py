"""Compare's settings diff (issue 19): over resolved values, so an omitted default is no difference, and shown as
text a person reads (no JSON escapes)."""

from typing import Any

from app.services.compare import config_diff, display_value
from app.web.pages import templates


def test_an_omitted_default_is_not_a_difference() -> None:
    # given: one job spelled out LoRA's default alpha, the other left it out; they differ in the system prompt
    spelled_out = {
        "dataset_id": 1,
        "method": "lora",
        "method_config": {"r": 8, "alpha": 16},
        "causal_lm": {"system_prompt": "Don't guess."},
    }
    omitted = {
        "dataset_id": 1,
        "method": "lora",
        "method_config": {"r": 8},
        "causal_lm": {"system_prompt": "It's fine."},
    }
    # when
    diff = config_diff([spelled_out, omitted])
    # then: only the real difference is listed
    assert diff == [{"field": "causal_lm.system_prompt", "values": ["Don't guess.", "It's fine."]}]


def test_settings_read_as_text() -> None:
    assert display_value("Don't guess.") == "Don't guess."
    assert display_value(["q_proj", "v_proj"]) == "q_proj, v_proj"
    assert display_value(0.0001) == "0.0001" and display_value(True) == "yes" and display_value(None) == "—"


def test_the_compare_page_shows_quotes_unescaped() -> None:
    # given: a diff row whose values hold apostrophes
    class FakeJob:
        def __init__(self, job_id: int) -> None:
            self.id = job_id

    comparison: Any = type(
        "C",
        (),
        {
            "jobs": [FakeJob(1), FakeJob(2)],
            "summary": [],
            "running": False,
            "diff": [{"field": "causal_lm.system_prompt", "values": ["Don't guess.", None]}],
        },
    )()
    # when
    html = templates.get_template("_compare_body.html").render(comparison=comparison, job_ids="1,2")
    # then: the text reads as written (HTML-escaped apostrophe at most, never a JSON \\u0027)
    assert "\\u0027" not in html
    assert "Don&#39;t guess." in html or "Don't guess." in html
