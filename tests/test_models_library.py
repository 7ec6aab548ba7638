"""The model library: /api/v1/models lists the bundled model, registered folders and the Hub cache,
described from files alone (no torch in the web), and the admin frees disk by deleting a cached model."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests import lm
from tests.conftest import Account

tiny_lm = lm.tiny_lm  # the session fixture, made available to this module

HTML = {"accept": "text/html"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, card: str | None = None) -> Path:
    """Lay a model folder out as huggingface_hub's cache does (blobs, a snapshot of symlinks, refs/main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if card is not None:
        files["README.md"] = card.encode()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / blob.name)
    return repo


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache for this test (huggingface_hub reads HF_HUB_CACHE from its constants)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def parameters_by_torch(folder: Path) -> int:
    """The parameter count as torch counts the weights file (the library reads only headers)."""
    from safetensors.torch import load_file

    return sum(t.numel() for f in folder.glob("*.safetensors") for t in load_file(f).values())


def test_the_bundled_model_is_described_from_its_files(client: TestClient, hub_cache: Path) -> None:
    # when
    body = client.get("/api/v1/models").json()
    # then
    bundled = next(m for m in body["data"] if m["source"] == "bundled")
    assert bundled["model_id"] == "bundled/all-MiniLM-L6-v2"
    assert bundled["architecture"] == "BertModel"
    assert bundled["parameters"] == parameters_by_torch(Path(bundled["path"]))
    assert bundled["context_length"] == 512
    assert bundled["licence"] == "apache-2.0"
    assert bundled["tasks"] == ["sequence-classification"]
    assert bundled["chat_template"] is False
    assert bundled["size_bytes"] > 80_000_000
    assert body["recommended"], "starting points are offered"


def test_hub_cache_models_are_listed_with_their_fetch_date_and_filtered_by_task(
    client: TestClient, hub_cache: Path, tiny_lm: Path
) -> None:
    # given
    put_in_hub_cache(hub_cache, "acme/tiny-chat", tiny_lm, card="---\nlicense: mit\ntags: [x]\n---\n# Tiny\n")
    # when
    causal = client.get("/api/v1/models", params={"task": "causal-lm"}).json()["data"]
    classifiers = client.get("/api/v1/models", params={"task": "sequence-classification"}).json()["data"]
    # then
    model = next(m for m in causal if m["model_id"] == "acme/tiny-chat")
    assert model["source"] == "hub" and model["revision"] == COMMIT
    assert model["architecture"] == "LlamaForCausalLM"
    assert model["parameters"] == parameters_by_torch(tiny_lm)
    assert model["chat_template"] is True
    assert model["licence"] == "mit"
    assert model["fetched_at"] is not None
    assert model["size_bytes"] >= sum(p.stat().st_size for p in tiny_lm.iterdir() if p.is_file())
    assert "acme/tiny-chat" not in [m["model_id"] for m in classifiers]
    assert "bundled/all-MiniLM-L6-v2" not in [m["model_id"] for m in causal]
    detail = client.get("/api/v1/models/acme/tiny-chat")
    assert detail.status_code == 200 and detail.json()["parameters"] == model["parameters"]


def test_registered_folders_are_listed_and_pickle_only_models_are_flagged(
    client: TestClient, hub_cache: Path, tiny_lm: Path
) -> None:
    # given: a copy of the tiny LM whose weights are a pickle file (the registered folder is pytest's temp)
    pickled = tiny_lm.parent / "pickled-lm"
    if not pickled.exists():
        shutil.copytree(tiny_lm, pickled)
        (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    # when
    models = {m["model_id"]: m for m in client.get("/api/v1/models").json()["data"]}
    # then
    assert models[str(tiny_lm)]["source"] == "folder"
    assert models[str(tiny_lm)]["weights"] == "safetensors"
    assert models[str(pickled)]["weights"] == "pickle"
    assert models[str(pickled)]["problems"]


def test_admin_deletes_a_cached_model_and_frees_the_disk(
    client: TestClient, hub_cache: Path, tiny_lm: Path, other_user: Account
) -> None:
    # given
    repo = put_in_hub_cache(hub_cache, "acme/tiny-chat", tiny_lm)
    # when another user tries, then the bundled model
    assert client.delete("/api/v1/models/acme/tiny-chat", headers=other_user.headers).status_code == 403
    assert client.delete("/api/v1/models/bundled/all-MiniLM-L6-v2").status_code == 403
    # when the admin deletes
    response = client.delete("/api/v1/models/acme/tiny-chat")
    # then
    assert response.status_code == 200, response.text
    assert response.json()["freed_bytes"] > 0
    assert not repo.exists()
    assert client.get("/api/v1/models/acme/tiny-chat").status_code == 404


def test_the_library_does_not_collide_with_the_openai_models_route(
    client: TestClient, hub_cache: Path
) -> None:
    openai = client.get("/v1/models").json()
    assert openai["object"] == "list"
    assert "recommended" not in openai


def test_models_page_lists_the_library_and_recommends_starting_points(
    client: TestClient, hub_cache: Path
) -> None:
    page = client.get("/models", headers=HTML)
    assert page.status_code == 200
    assert "bundled/all-MiniLM-L6-v2" in page.text
    assert "Qwen/Qwen2.5-0.5B-Instruct" in page.text, "the recommended list shows when the cache is empty"
    filtered = client.get("/models", params={"task": "causal-lm"}, headers=HTML).text
    assert 'data-model="bundled/all-MiniLM-L6-v2"' not in filtered


def test_the_web_lists_models_without_importing_torch(hub_cache: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, app.services.models as m; m.list_models(); "
        "print(json.dumps(sorted(k for k in ('torch', 'transformers') if k in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == []
