"""Hub downloads against a Hub-compatible server on loopback (tests/hub_server.py): progress streamed over
SSE, verified files in the shared cache, interruption and resume, cancel, gated repositories and the user's
encrypted token, and the refusals (pickle-only weights, custom code unless allow-listed)."""

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests import lm, test_models_library
from tests.conftest import Account
from tests.hub_server import HubServer, run_hub
from tests.sse import read_events

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module
hub_cache = test_models_library.hub_cache  # and the per-test Hub cache

CUSTOM_CONFIG = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
"""
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


@pytest.fixture
def hub(
    client: TestClient,
    hub_cache: Path,
    tiny_lm: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[HubServer]:
    """A loopback Hub serving the tiny LM as acme/tiny-chat, a gated copy, one with only pickle weights and
    one with its own code; downloads turned on for the in-process studio."""
    from huggingface_hub import constants

    from app.core.settings import get_settings

    with run_hub() as server:
        server.add_folder("acme/tiny-chat", tiny_lm)
        server.add_folder("acme/gated-chat", tiny_lm, token="hf_secret_token_123")
        pickled = {p.name: p.read_bytes() for p in tiny_lm.iterdir() if p.name != "model.safetensors"}
        pickled["pytorch_model.bin"] = (tiny_lm / "model.safetensors").read_bytes()
        server.add_repo("acme/pickled-chat", pickled)
        config = json.loads((tiny_lm / "config.json").read_text())
        config["model_type"] = "tiny-custom"
        config["architectures"] = ["TinyCustomForCausalLM"]
        config["auto_map"] = {
            "AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM",
        }
        server.add_folder(
            "acme/custom-chat",
            tiny_lm,
            config__json=json.dumps(config).encode(),
            configuration_tiny__py=CUSTOM_CONFIG.encode(),
            modeling_tiny__py=CUSTOM_MODEL.encode(),
        )
        # huggingface_hub writes (and resumes at) 10 MB chunks; the tiny model is smaller than one
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)
        # HF_ENDPOINT, as huggingface_hub reads it at import time
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("PEFT_STUDIO_HUB_DOWNLOADS", "true")
        get_settings.cache_clear()
        yield server
        get_settings.cache_clear()


def start(client: TestClient, model_id: str, **options: Any) -> dict[str, Any]:
    response = client.post("/api/v1/model-downloads", json={"model_id": model_id}, **options)
    assert response.status_code == 202, response.text
    return dict(response.json())


def run(download_id: int) -> dict[str, Any]:
    """Run the worker's download (the Celery task's body) and return the row."""
    from app.core.db import session_scope
    from app.services.model_downloads import get_download, progress
    from worker.downloads import run_download

    run_download(download_id, "test-worker")
    with session_scope() as session:
        return progress(get_download(session, download_id))


def test_downloads_are_off_by_default_and_say_how_to_turn_them_on(client: TestClient) -> None:
    response = client.post("/api/v1/model-downloads", json={"model_id": "acme/tiny-chat"})
    assert response.status_code == 503
    assert "PEFT_STUDIO_HUB_DOWNLOADS" in response.json()["detail"]
    assert client.get("/api/v1/model-downloads").json()["enabled"] is False
    assert "PEFT_STUDIO_HUB_DOWNLOADS" in client.get("/models", headers={"accept": "text/html"}).text


def test_a_download_streams_its_progress_and_lands_verified_in_the_library(
    client: TestClient,
    hub: HubServer,
    tiny_lm: Path,
    hub_cache: Path,
) -> None:
    # given a slow Hub, so that progress is seen between the first byte and the last
    size = (tiny_lm / "model.safetensors").stat().st_size
    hub.throttle = size / 3
    download = start(client, "acme/tiny-chat")
    worker = threading.Thread(target=run, args=(download["id"],))
    # when
    worker.start()
    events = []
    with client.stream("GET", f"/api/v1/model-downloads/{download['id']}/stream") as stream:
        for event in read_events(stream):
            events.append(event)
            if event.event == "end":
                break
    worker.join(timeout=120)
    # then
    progress = [json.loads(e.data) for e in events if e.event == "progress"]
    assert progress[-1]["status"] == "succeeded"
    assert progress[-1]["done_bytes"] == progress[-1]["total_bytes"] > size
    partial = [p for p in progress if p["status"] == "running" and 0 < p["done_bytes"] < p["total_bytes"]]
    assert partial, "progress was reported before the end"
    assert any(p["bytes_per_second"] > 0 and p["eta_seconds"] for p in partial)
    assert progress[-1]["done_files"] == progress[-1]["total_files"] == len(list(tiny_lm.iterdir()))
    model = client.get("/api/v1/models/acme/tiny-chat").json()
    assert model["source"] == "hub" and model["tasks"] == ["causal-lm", "preference"]
    assert model["revision"] == hub.repos["acme/tiny-chat"].commit
    from app.core.base_models import resolve_base_model

    assert resolve_base_model("acme/tiny-chat").path.is_relative_to(hub_cache)


def test_an_interrupted_transfer_resumes_with_a_range_request(
    client: TestClient,
    hub: HubServer,
) -> None:
    # given a Hub that cuts the weights' connection after 64 KiB once
    hub.drop_after = 65536
    # when
    row = run(start(client, "acme/tiny-chat")["id"])
    # then
    assert row["status"] == "succeeded", row["error"]
    ranges = [
        r for method, path, r in hub.requests if method == "GET" and path.endswith(".safetensors") and r
    ]
    assert ranges and int(ranges[0].split("=")[1].rstrip("-")) >= 16384, "resumed from what it had"


def test_cancel_stops_the_transfer_and_asking_again_fetches_only_what_is_missing(
    client: TestClient, hub: HubServer, tiny_lm: Path, hub_cache: Path
) -> None:
    # given a slow download under way, past the small files and into the weights
    weights = (tiny_lm / "model.safetensors").stat().st_size
    hub.throttle = weights / 4
    download = start(client, "acme/tiny-chat")
    worker = threading.Thread(target=run, args=(download["id"],))
    worker.start()
    with client.stream("GET", f"/api/v1/model-downloads/{download['id']}/stream") as stream:
        for event in read_events(stream):
            data = json.loads(event.data)
            started = event.event == "progress" and data["total_bytes"] > weights
            if started and data["done_bytes"] > data["total_bytes"] - weights + 16384:
                break
    # when
    cancelled = client.post(f"/api/v1/model-downloads/{download['id']}/cancel")
    worker.join(timeout=60)
    # then
    assert cancelled.status_code == 200
    row = client.get(f"/api/v1/model-downloads/{download['id']}").json()
    assert row["status"] == "cancelled"
    assert 0 < row["done_files"] < row["total_files"], row
    assert not list(hub_cache.rglob("model.safetensors")), "the weights were not finished"
    # when asked again
    hub.throttle = None
    hub.requests.clear()
    again = run(start(client, "acme/tiny-chat")["id"])
    # then: the files finished before the cancel are not fetched again
    assert again["status"] == "succeeded", again["error"]
    fetched = [
        path.rsplit("/", 1)[1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path
    ]
    assert "model.safetensors" in fetched
    assert "config.json" not in fetched and "chat_template.jinja" not in fetched


def test_a_gated_model_needs_the_users_saved_token_which_is_never_shown(
    client: TestClient,
    hub: HubServer,
    other_user: Account,
) -> None:
    # when bob downloads without a token
    refused = run(start(client, "acme/gated-chat", headers=other_user.headers)["id"])
    # then
    assert refused["status"] == "failed" and "gated" in refused["error"] and "token" in refused["error"]
    # when he saves his token and asks again
    saved = client.put(
        "/api/v1/me/hub-token", json={"token": "hf_secret_token_123"}, headers=other_user.headers
    )
    assert saved.status_code == 204
    row = run(start(client, "acme/gated-chat", headers=other_user.headers)["id"])
    # then
    assert row["status"] == "succeeded", row["error"]
    assert client.get("/api/v1/me/hub-token", headers=other_user.headers).json() == {"saved": True}
    assert client.get("/api/v1/me/hub-token").json() == {"saved": False}, "the admin has none of bob's"
    from sqlmodel import select

    from app.core.db import session_scope
    from app.core.models import HubToken

    with session_scope() as session:
        stored = session.exec(select(HubToken)).one()
        assert "hf_secret_token_123" not in stored.encrypted
    assert "hf_secret_token_123" not in json.dumps(client.get("/api/v1/model-downloads").json())


def test_pickle_only_weights_are_refused_before_any_weight_is_fetched(
    client: TestClient,
    hub: HubServer,
) -> None:
    row = run(start(client, "acme/pickled-chat")["id"])
    assert row["status"] == "failed"
    assert "pickle" in row["error"] and "safetensors" in row["error"]
    assert not [p for _, p, _ in hub.requests if p.endswith(".bin")]


def test_custom_code_is_refused_unless_allow_listed(
    client: TestClient,
    hub: HubServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.core.settings import get_settings

    # when not allow-listed
    refused = run(start(client, "acme/custom-chat")["id"])
    # then
    assert refused["status"] == "failed"
    assert "PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS" in refused["error"]
    assert not [p for _, p, _ in hub.requests if p.endswith(".safetensors")]
    # when the admin allow-lists it
    monkeypatch.setenv("PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS", json.dumps(["acme/custom-chat"]))
    get_settings.cache_clear()
    row = run(start(client, "acme/custom-chat")["id"])
    # then
    assert row["status"] == "succeeded", row["error"]
    assert "modeling_tiny.py" in row["files"]
    assert client.get("/api/v1/models/acme/custom-chat").json()["custom_code"] is True


def test_an_allow_listed_custom_code_model_loads_with_its_own_code_and_others_are_refused(
    client: TestClient, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.base_models import resolve_base_model
    from app.core.errors import InvalidSpec
    from app.core.settings import get_settings
    from worker.estimate import meta_model
    from worker.recipes.causal_lm import load_base

    # given the custom-code model in the cache, allow-listed
    monkeypatch.setenv("PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS", json.dumps(["acme/custom-chat"]))
    get_settings.cache_clear()
    assert run(start(client, "acme/custom-chat")["id"])["status"] == "succeeded"
    # when the worker loads it (training and inference share load_base's kwargs) and estimates it
    base = resolve_base_model("acme/custom-chat")
    model = load_base(base, {}, {})
    # then its own class ran (trust_remote_code=True was passed)
    assert type(model).__name__ == "TinyCustomForCausalLM"
    assert type(meta_model(base, "causal-lm", None)).__name__ == "TinyCustomForCausalLM"
    # when the admin takes it off the list
    monkeypatch.setenv("PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS", "[]")
    get_settings.cache_clear()
    # then it is refused before loading, and the loader itself would not run its code
    with pytest.raises(InvalidSpec, match="PEFT_STUDIO_TRUST_REMOTE_CODE_MODELS"):
        resolve_base_model("acme/custom-chat")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_base(base, {}, {})


@pytest.fixture(scope="module")
def hub_studio(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Iterator[tuple[Any, int]]:
    """One ``serve`` studio (and loopback Hub) for the two real-worker tests: a client and the Alpaca upload.
    Each test asks for a Hub id of its own, so the second still starts from an uncached model."""
    from tests.lm import ALPACA_DEMO
    from tests.studio import run_studio

    folder = tmp_path_factory.mktemp("hub-studio")
    with run_hub() as server:
        server.add_folder("acme/tiny-chat", tiny_lm)
        server.add_folder("acme/tiny-chat-uncached", tiny_lm)
        with (
            run_studio(
                folder / "data",
                HF_ENDPOINT=server.url,
                HF_HUB_CACHE=str(folder / "hub-cache"),
                PEFT_STUDIO_HUB_DOWNLOADS="true",
                PEFT_STUDIO_TORCH_THREADS="1",
            ) as studio,
            studio.client(timeout=120) as client,
        ):
            upload = client.post(
                "/api/v1/datasets",
                files={"file": ("alpaca_en_demo.json", ALPACA_DEMO.read_bytes(), "application/json")},
            )
            assert upload.status_code == 201, upload.text
            yield client, int(upload.json()["id"])


def test_a_model_downloaded_by_the_real_worker_trains_a_job(hub_studio: tuple[Any, int]) -> None:
    """Through ``serve``: the Celery worker fetches the model from the loopback Hub into its cache (HF_ENDPOINT,
    HF_HUB_CACHE), the web lists it, and a causal-LM job on it trains."""
    from tests.studio import wait_for_job

    client, dataset_id = hub_studio
    # when
    created = client.post("/api/v1/model-downloads", json={"model_id": "acme/tiny-chat"})
    assert created.status_code == 202, created.text
    events = []
    with client.stream("GET", f"/api/v1/model-downloads/{created.json()['id']}/stream") as stream:
        for event in read_events(stream):
            events.append(json.loads(event.data))
            if event.event == "end":
                break
    # then
    assert events[-1]["status"] == "succeeded", events[-2]
    assert events[-2]["worker"] and events[-2]["done_files"] == events[-2]["total_files"]
    listed = client.get("/api/v1/models", params={"task": "causal-lm"}).json()["data"]
    assert "acme/tiny-chat" in [m["model_id"] for m in listed]
    # when a job trains on it
    spec = {
        "task": "causal-lm",
        "base_model": "acme/tiny-chat",
        "dataset_id": dataset_id,
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 128, "logging_steps": 1},
    }
    job = client.post("/api/v1/jobs", json=spec)
    assert job.status_code == 201, job.text
    finished = wait_for_job(client, job.json()["id"])
    # then
    assert finished["status"] == "succeeded", finished.get("error")


def _upload_alpaca(client: Any) -> int:
    from tests.lm import ALPACA_DEMO

    upload = client.post(
        "/api/v1/datasets",
        files={"file": ("alpaca_en_demo.json", ALPACA_DEMO.read_bytes(), "application/json")},
    )
    assert upload.status_code == 201, upload.text
    return int(upload.json()["id"])


def _lm_spec(base_model: str, dataset_id: int) -> dict[str, Any]:
    return {
        "task": "causal-lm",
        "base_model": base_model,
        "dataset_id": dataset_id,
        "training": {"max_steps": 2, "batch_size": 4, "max_length": 128, "logging_steps": 1},
    }


def test_with_downloads_off_an_uncached_hub_model_is_refused_naming_the_setting(client: TestClient) -> None:
    response = client.post("/api/v1/jobs", json=_lm_spec("acme/not-cached", _upload_alpaca(client)))
    assert response.status_code == 422
    detail = json.dumps(response.json())
    assert "not an allowed base model" in detail and "PEFT_STUDIO_HUB_DOWNLOADS=true" in detail


def test_with_downloads_on_a_path_is_still_refused(client: TestClient, hub: HubServer) -> None:
    response = client.post("/api/v1/jobs", json=_lm_spec("/etc/models/x", _upload_alpaca(client)))
    assert response.status_code == 422
    assert "not an allowed base model" in json.dumps(response.json())


def test_cancelling_a_job_stops_the_download_of_its_model(
    client: TestClient, hub: HubServer, tiny_lm: Path
) -> None:
    from app.core.db import session_scope
    from app.core.models import Job, JobStatus
    from worker.downloads import download_for_job

    # given a running job on an uncached model, and a slow Hub
    hub.throttle = (tiny_lm / "model.safetensors").stat().st_size / 4
    with session_scope() as session:
        job = Job(name="j", spec={}, method="lora", base_model="acme/tiny-chat", status=JobStatus.running)
        session.add(job)
        session.commit()
        job_id = job.id
    assert job_id is not None
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(download_for_job(job_id, "acme/tiny-chat", "w")))
    worker.start()
    # when the job is cancelled while its model downloads
    for _ in range(200):
        events = [e["message"] for e in client.get(f"/api/v1/jobs/{job_id}/events").json()]
        if any("downloading acme/tiny-chat" in m for m in events):
            break
        time.sleep(0.1)
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert row is not None
        row.cancel_requested = True
        session.add(row)
        session.commit()
    worker.join(timeout=60)
    # then the download stops and the job is told
    assert result == [False]
    downloads = client.get("/api/v1/model-downloads").json()["data"]
    assert downloads[0]["model_id"] == "acme/tiny-chat" and downloads[0]["status"] == "cancelled"


def test_a_job_on_an_uncached_hub_model_downloads_it_first_then_trains(hub_studio: tuple[Any, int]) -> None:
    """Through ``serve``: the job names a Hub id that is not cached; the real worker fetches it from the
    loopback Hub as the job's first phase (its events say so), then trains on it."""
    from tests.studio import wait_for_job

    client, dataset_id = hub_studio
    model_id = "acme/tiny-chat-uncached"
    # when
    job = client.post("/api/v1/jobs", json=_lm_spec(model_id, dataset_id))
    assert job.status_code == 201, job.text
    finished = wait_for_job(client, job.json()["id"])
    # then
    assert finished["status"] == "succeeded", finished.get("error")
    events = [e["message"] for e in client.get(f"/api/v1/jobs/{job.json()['id']}/events").json()]
    assert any(m.startswith(f"{model_id} is not in the model cache yet") for m in events), events
    assert any(m.startswith(f"downloading {model_id}: 0 % of") for m in events), events
    assert any(m.startswith(f"downloaded {model_id} (") for m in events), events
    downloads = client.get("/api/v1/model-downloads").json()["data"]
    assert [d["status"] for d in downloads if d["model_id"] == model_id] == ["succeeded"]
    listed = client.get("/api/v1/models", params={"task": "causal-lm"}).json()["data"]
    assert model_id in [m["model_id"] for m in listed]


def test_the_hub_token_is_saved_and_forgotten_on_the_account_page(client: TestClient, hub: HubServer) -> None:
    # given no token, and the Models page pointing to the account page for it
    assert 'href="/account#hub-token"' in client.get("/models").text
    account = client.get("/account").text
    assert "No token saved." in account
    assert account.count('data-testid="hub-token-form"') == 1 and "<title>Your account" in account
    assert "<section" not in account.split("<title>", 1)[1].split("</title>", 1)[0], (
        "the form is in the title"
    )
    # when a malformed one is saved
    bad = client.post("/account/hub-token", data={"token": "two words"}, follow_redirects=False)
    # then the account page says why
    assert bad.status_code == 422 and "one word" in bad.text
    # when a token is saved
    saved = client.post("/account/hub-token", data={"token": "hf_page_token_456"}, follow_redirects=False)
    # then
    assert saved.status_code == 303 and saved.headers["location"] == "/account?token=saved"
    page = client.get("/account?token=saved").text
    assert "A token is saved" in page and "Token saved." in page
    assert "hf_page_token_456" not in page, "never shown again"
    assert client.get("/api/v1/me/hub-token").json() == {"saved": True}
    assert "a token is saved" in client.get("/models").text
    # when it is forgotten
    forgotten = client.post("/account/hub-token/delete", follow_redirects=False)
    # then
    assert forgotten.status_code == 303
    assert client.get("/api/v1/me/hub-token").json() == {"saved": False}
    assert "No token saved." in client.get("/account?token=forgotten").text
