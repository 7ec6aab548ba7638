"""`peft-studio adapters list` prints a readable table (issue 19): sizes with units and the headline metric,
not the metrics JSON."""

from typing import Any

import pytest
from typer.testing import CliRunner

from app.client import cli as client_cli

ADAPTERS = {
    "count": 2,
    "data": [
        {
            "id": 2,
            "job_id": 7,
            "name": "chat",
            "method": "lora",
            "task": "causal-lm",
            "size_bytes": 3_500_000,
            "metrics": {"loss": 1.234, "perplexity": 3.435, "runtime": 5.068},
        },
        {
            "id": 1,
            "job_id": 5,
            "name": "sst2",
            "method": "ia3",
            "task": "sequence-classification",
            "size_bytes": 1536,
            "metrics": {"accuracy": 0.8125, "f1_macro": 0.8, "runtime": 2.0},
        },
    ],
}


def test_adapters_list_prints_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    # given: a studio answering two adapters (its HTTP answer stands in; the real API is covered in test_client_cli)
    def request(self: Any, method: str, path: str, **kwargs: Any) -> Any:
        assert (method, path) == ("GET", "/api/v1/adapters")
        return ADAPTERS

    monkeypatch.setattr(client_cli.Studio, "request", request)
    app = typer.Typer()
    client_cli.mount(app)
    # when
    result = CliRunner().invoke(app, ["adapters", "list"], env={"COLUMNS": "160"})
    # then: a table with units and labelled metrics, no JSON
    assert result.exit_code == 0, result.output
    assert "Adapters (2)" in result.output
    assert "3.3 MB" in result.output and "1.5 KB" in result.output
    assert "perplexity 3.435" in result.output and "accuracy 0.8125" in result.output
    assert "{" not in result.output and "runtime" not in result.output
