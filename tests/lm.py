"""Fixtures for causal-LM tests: a tiny Llama with a real tokenizer trained on the Alpaca demo texts.

Import the fixtures into a test module (``from tests.lm import tiny_lm  # noqa: F401``). The model is made by
the same code as ``peft-studio make-tiny-lm``, once per test session.
"""

import json
from pathlib import Path
from typing import Any

import pytest

from tests.studio import SHARED_DATA

ALPACA_DEMO = SHARED_DATA / "alpaca" / "alpaca_en_demo.json"

# Short instruction/response pairs a LoRA run memorises in a few dozen steps.
MEMORISE = [
    {
        "instruction": "What is the capital of France?",
        "input": "",
        "output": "The capital of France is Paris.",
    },
    {"instruction": "Name a primary color.", "input": "", "output": "Blue is a primary color."},
    {"instruction": "Translate to French:", "input": "good morning", "output": "Bonjour."},
    {
        "instruction": "Give a tip for staying healthy.",
        "input": "",
        "output": "Drink enough water every day.",
    },
]


def alpaca_rows(count: int | None = None) -> list[dict[str, Any]]:
    """Rows of the shared Alpaca demo file (all 999 by default)."""
    rows: list[dict[str, Any]] = json.loads(ALPACA_DEMO.read_text(encoding="utf-8"))
    return rows if count is None else rows[:count]


def json_bytes(rows: list[dict[str, Any]]) -> bytes:
    """Rows as the bytes of a .json dataset file."""
    return json.dumps(rows).encode()


def prompt_of(row: dict[str, Any]) -> str:
    """The user message an Alpaca row becomes (instruction, then the input after a blank line)."""
    return f"{row['instruction']}\n\n{row['input']}" if row["input"] else str(row["instruction"])


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder whose tokenizer was trained on the Alpaca demo texts (ChatML template)."""
    from worker.tiny_lm import corpus_from_file, make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), corpus_from_file(ALPACA_DEMO))
