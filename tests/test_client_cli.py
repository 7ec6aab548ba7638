"""The REST client CLI (``peft-studio datasets|jobs|adapters|tokens``) in subprocesses against a running studio:
upload, create from a YAML spec, watch to completion, download; exit codes for scripts."""

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.client.cli import build_spec
from tests import lm
from tests.lm import MEMORISE, json_bytes
from tests.studio import PROJECT_ROOT, RunningStudio, free_port, run_studio

pytestmark = pytest.mark.e2e

tiny_lm = lm.tiny_lm


def cli(
    *args: str, studio: RunningStudio | None = None, token: str | None = None, timeout: float = 300
) -> Any:
    """Run ``peft-studio`` with the studio's URL and token in PEFT_STUDIO_URL / PEFT_STUDIO_TOKEN."""
    script = Path(sys.executable).parent / "peft-studio"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFT_STUDIO_")}
    env.update(HF_HUB_OFFLINE="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")
    if studio is not None:
        env["PEFT_STUDIO_URL"] = studio.url
        env["PEFT_STUDIO_TOKEN"] = token if token is not None else studio.token
    return subprocess.run(
        [*command, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStudio]:
    data_dir = tmp_path_factory.mktemp("client-cli") / "data"
    with run_studio(data_dir, workers=1, PEFT_STUDIO_TORCH_THREADS="1") as running:
        yield running


@pytest.fixture(scope="module")
def dataset_id(studio: RunningStudio, tmp_path_factory: pytest.TempPathFactory) -> int:
    path = tmp_path_factory.mktemp("cli-data") / "memorise.json"
    path.write_bytes(json_bytes(MEMORISE * 4))
    result = cli("datasets", "upload", str(path), "--name", "memorise", "--json", studio=studio)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["id"])


def test_help_lists_the_client_groups() -> None:
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for group in ("datasets", "jobs", "adapters", "tokens"):
        assert group in result.stdout
    watch = cli("jobs", "watch", "--help")
    assert "--url" in watch.stdout and "--token" in watch.stdout and "PEFT_STUDIO_URL" in watch.stdout


def test_spec_file_then_flags_then_set(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"task": "causal-lm", "dataset_id": 1, "training": {"max_steps": 5}}))

    spec = build_spec(
        spec_file,
        {"dataset_id": 2, "training.batch_size": 4},
        ["training.max_steps=9", "causal_lm.packing=true"],
    )

    assert spec == {
        "task": "causal-lm",
        "dataset_id": 2,
        "training": {"max_steps": 9, "batch_size": 4},
        "causal_lm": {"packing": True},
    }


def test_upload_create_watch_and_download(
    studio: RunningStudio, dataset_id: int, tiny_lm: Path, tmp_path: Path
) -> None:
    # given a spec file in YAML
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {
                "name": "cli job",
                "task": "causal-lm",
                "base_model": str(tiny_lm),
                "dataset_id": dataset_id,
                "validation_fraction": 0.25,
                "method": "lora",
                "causal_lm": {"format": "alpaca"},
                "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "max_length": 64},
            }
        )
    )
    listed = cli("datasets", "list", studio=studio)
    assert listed.returncode == 0 and "memorise" in listed.stdout

    # when it is created (a flag overrides the file) and watched
    created = cli(
        "jobs",
        "create",
        "--spec",
        str(spec_file),
        "--set",
        "training.logging_steps=1",
        "--json",
        studio=studio,
    )
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["spec"]["training"]["logging_steps"] == 1 and job["name"] == "cli job"
    watched = cli("jobs", "watch", str(job["id"]), "--interval", "0.5", "--timeout", "280", studio=studio)

    # then it succeeded, with the loss shown, and exit code 0
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert f"job {job['id']} succeeded" in watched.stdout and "train loss" in watched.stdout

    adapters = cli("adapters", "list", "--json", studio=studio)
    adapter = next(a for a in json.loads(adapters.stdout) if a["job_id"] == job["id"])
    target = tmp_path / "adapter.zip"
    downloaded = cli("adapters", "download", str(adapter["id"]), "--output", str(target), studio=studio)
    assert downloaded.returncode == 0, downloaded.stderr
    with zipfile.ZipFile(target) as archive:
        assert "adapter_config.json" in archive.namelist() and "studio.json" in archive.namelist()

    jobs = cli("jobs", "list", studio=studio)
    assert jobs.returncode == 0 and "cli job" in jobs.stdout and "succeeded" in jobs.stdout


def test_watch_exits_3_for_a_cancelled_job(studio: RunningStudio, dataset_id: int, tiny_lm: Path) -> None:
    created = cli(
        "jobs", "create", "--dataset-id", str(dataset_id), "--base-model", str(tiny_lm), "--task", "causal-lm",
        "--max-steps", "5000", "--set", "causal_lm.format=alpaca", "--set", "training.max_length=64", "--json",
        studio=studio,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    job_id = str(json.loads(created.stdout)["id"])
    assert cli("jobs", "cancel", job_id, studio=studio).returncode == 0

    watched = cli("jobs", "watch", job_id, "--interval", "0.5", "--timeout", "120", studio=studio)

    assert watched.returncode == 3, watched.stdout + watched.stderr
    assert "cancelled" in watched.stdout


def test_tokens_create_prints_a_working_token(studio: RunningStudio) -> None:
    created = cli("tokens", "create", "ci laptop", studio=studio)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("pst_") and token != studio.token

    assert cli("datasets", "list", studio=studio, token=token).returncode == 0


def test_exit_codes_for_scripts(studio: RunningStudio, tmp_path: Path) -> None:
    refused = cli("datasets", "list", studio=studio, token="pst_not-a-token")
    assert refused.returncode == 4 and "401" in refused.stderr

    missing = cli("jobs", "watch", "99999", studio=studio)
    assert missing.returncode == 4 and "404" in missing.stderr

    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text("- just\n- a list\n")
    assert cli("jobs", "create", "--spec", str(bad_spec), studio=studio).returncode == 2

    invalid = cli("jobs", "create", "--dataset-id", "99999", studio=studio)
    assert invalid.returncode == 4 and "99999" in invalid.stderr

    unreachable = cli("datasets", "list", "--url", f"http://127.0.0.1:{free_port()}", "--token", "x")
    assert unreachable.returncode == 5 and "cannot reach" in unreachable.stderr
