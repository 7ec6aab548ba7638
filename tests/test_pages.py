"""HTML pages: every page renders, the job form is generated from the models, form errors name the field."""

import io
import re
import subprocess
import sys
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from pydantic import BaseModel
from sqlmodel import Session

from app.core.db import get_engine
from app.core.models import Adapter
from app.core.spec import JobSpec, Scheduler, TrainingSettings
from app.services.datasets import DEMO_DATASET_PATH
from app.web import forms
from tests.studio import PROJECT_ROOT
from worker.methods import registry
from worker.methods.lora import LoraSettings

HTML = {"accept": "text/html"}
HTMX = {"accept": "text/html", "hx-request": "true"}
CSV = b"text,label\na fine film,1\na dull film,0\nlovely,1\nawful,0\nsplendid,1\ntedious,0\n"


def upload(client: TestClient, content: bytes = CSV, filename: str = "reviews.csv") -> dict[str, Any]:
    """A dataset uploaded through the JSON API."""
    response = client.post("/api/v1/datasets", files={"file": (filename, content, "text/csv")})
    assert response.status_code == 201, response.text
    return dict(response.json())


def job_count(client: TestClient) -> int:
    return int(client.get("/api/v1/jobs").json()["count"])


def model_inputs(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(input name, help text) for every field of a model, nested models included; the method's config is
    LoRA's (the default method)."""
    inputs: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            inputs += model_inputs(info.annotation, f"{prefix}{name}.")
        elif name == "method_config" and model is JobSpec:
            inputs += model_inputs(LoraSettings, "method_config.")
        else:
            inputs.append((f"{prefix}{name}", info.description or ""))
    return inputs


# ---- every page renders ------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/", "/datasets", "/jobs", "/jobs/new", "/adapters"])
def test_list_pages_render_on_an_empty_studio(client: TestClient, url: str) -> None:
    response = client.get(url, headers=HTML)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "PEFT Studio" in response.text
    assert "/static/vendor/htmx.min.js" in response.text


def test_dashboard_offers_the_demo_dataset_only_while_there_are_none(client: TestClient) -> None:
    assert 'data-testid="load-demo"' in client.get("/", headers=HTML).text

    upload(client)

    assert 'data-testid="load-demo"' not in client.get("/", headers=HTML).text


def test_detail_pages_render(client: TestClient) -> None:
    # given: a dataset, a queued job and an adapter row for it
    dataset = upload(client)
    created = client.post("/jobs/new", data={"dataset_id": str(dataset["id"])}, follow_redirects=False)
    job_id = int(created.headers["location"].rsplit("/", 1)[-1])
    with Session(get_engine()) as session:
        adapter = Adapter(
            job_id=job_id,
            name="demo adapter",
            method="lora",
            task="sequence-classification",
            base_model="bundled/all-MiniLM-L6-v2",
            storage_key="adapters/x",
            size_bytes=123_456,
            files=["adapter_config.json", "adapter_model.safetensors"],
            trainable_params=1_000,
            total_params=100_000,
            labels=["0", "1"],
            metrics={"accuracy": 0.875, "loss": 0.31},
        )
        session.add(adapter)
        session.commit()
        adapter_id = adapter.id

    # when / then
    page = client.get(f"/datasets/{dataset['id']}", headers=HTML)
    assert page.status_code == 200
    assert 'data-testid="label-counts"' in page.text and 'data-testid="length-histogram"' in page.text
    assert "a fine film" in page.text  # preview
    assert f"/jobs/new?dataset_id={dataset['id']}" in page.text

    page = client.get(f"/jobs/{job_id}", headers=HTML)
    assert page.status_code == 200
    assert 'data-testid="job-status">queued</span>' in page.text
    assert 'data-points="0"' in page.text
    assert f"/api/v1/jobs/{job_id}/cancel" in page.text
    assert "/static/vendor/uPlot.iife.min.js" in page.text and "/static/app.js" in page.text
    assert client.get(f"/jobs/{job_id}/events", headers=HTMX).text.count("queued") >= 1

    assert 'hx-trigger="every 3s"' in client.get("/", headers=HTML).text  # refreshes while a job is active
    assert 'hx-trigger="every 3s"' in client.get("/jobs", headers=HTML).text

    page = client.get("/adapters", headers=HTML)
    assert "demo adapter" in page.text and f"/api/v1/adapters/{adapter_id}/download" in page.text
    assert "1.00%" in page.text  # trainable share
    page = client.get(f"/adapters/{adapter_id}", headers=HTML)
    assert page.status_code == 200 and 'data-testid="predict-text"' in page.text


def test_missing_things_are_404_pages(client: TestClient) -> None:
    for url in ("/datasets/99", "/jobs/99", "/adapters/99"):
        response = client.get(url, headers=HTML)
        assert response.status_code == 404
        assert "does not exist" in response.text and "<nav>" in response.text


def test_static_files_are_served(client: TestClient) -> None:
    for path in (
        "app.css",
        "app.js",
        "vendor/htmx.min.js",
        "vendor/uPlot.iife.min.js",
        "vendor/uPlot.min.css",
    ):
        assert client.get(f"/static/{path}").status_code == 200, path


# ---- the generated job form --------------------------------------------------------------------


def test_job_form_shows_every_spec_training_and_method_field_with_its_help(client: TestClient) -> None:
    page = client.get("/jobs/new", headers=HTML).text

    expected = model_inputs(JobSpec)
    assert {f"training.{name}" for name in TrainingSettings.model_fields} <= {name for name, _ in expected}
    assert {f"method_config.{name}" for name in LoraSettings.model_fields} <= {name for name, _ in expected}
    for name, help_text in expected:
        assert f'name="{name}"' in page, name
        assert str(escape(help_text)) in page, f"help text of {name}"


def test_job_form_input_types_follow_the_annotations() -> None:
    fields = {f.name: f for section in forms.job_form() for f in section.fields}

    defaults = TrainingSettings()
    assert fields["training.batch_size"].kind == "number" and fields["training.batch_size"].step == "1"
    # "auto or a number" settings are text inputs showing auto (docs/defaults.md)
    assert fields["training.learning_rate"].kind == "text"
    assert fields["training.learning_rate"].value == str(defaults.learning_rate) == "auto"
    assert fields["training.lr_scheduler"].kind == "select"
    assert [c.value for c in fields["training.lr_scheduler"].choices] == list(get_args(Scheduler))
    assert fields["training.disable_dropout"].kind == "checkbox"
    assert fields["training.disable_dropout"].checked is defaults.disable_dropout
    assert fields["training.max_steps"].nullable and fields["training.max_steps"].value == ""
    assert fields["method_config.target_modules"].kind == "list"
    assert fields["method_config.target_modules"].value == ", ".join(LoraSettings().target_modules)
    assert fields["dataset_id"].required and fields["dataset_id"].min == 1


def test_every_registered_method_gets_its_own_fields(client: TestClient) -> None:
    for name, info in registry().items():
        fragment = client.get(f"/jobs/new/method?method={name}", headers=HTMX)
        assert fragment.status_code == 200
        assert 'id="section-method"' in fragment.text
        for field_name in info.config.model_fields:
            assert f'name="method_config.{field_name}"' in fragment.text
    assert client.get("/jobs/new/method?method=nope", headers=HTMX).status_code == 404


def test_job_form_preselects_the_dataset_and_guesses_its_columns(client: TestClient) -> None:
    content = b"review,sentiment\nfine,pos\ndull,neg\ngood,pos\nbad,neg\n"
    dataset = upload(client, content, "other.csv")

    page = client.get(f"/jobs/new?dataset_id={dataset['id']}", headers=HTML).text

    assert f'<option value="{dataset["id"]}" selected>' in page
    # the columns are offered as dropdowns of the dataset's columns, the proposal chosen
    assert re.search(
        r'<select id="f-text-column" name="text_column"(?:(?!</select>).)*<option value="review" selected>',
        page,
        re.S,
    )
    assert re.search(
        r'<select id="f-label-column" name="label_column"(?:(?!</select>).)*<option value="sentiment" selected>',
        page,
        re.S,
    )


def test_form_post_parses_checkboxes_lists_and_empty_optionals() -> None:
    data = forms.form_to_input(
        {
            "dataset_id": ["3"],
            "validation_dataset_id": [""],
            "training.disable_dropout": ["false"],  # hidden input only: the box was unticked
            "training.group_by_length": ["false", "true"],
            "training.max_steps": [""],
            "method_config.target_modules": ["query, value ,"],
        }
    )

    assert data["validation_dataset_id"] is None
    assert data["training"]["disable_dropout"] is False and data["training"]["group_by_length"] is True
    assert data["training"]["max_steps"] is None
    assert data["method_config"]["target_modules"] == ["query", "value"]
    spec, errors = forms.validate_job_input(data)
    assert errors == {} and spec is not None and spec.dataset_id == 3


def test_posted_form_stores_the_spec_the_api_would(client: TestClient) -> None:
    dataset = upload(client)
    form = {
        "name": "from the form",
        "dataset_id": str(dataset["id"]),
        "method": "lora",
        "method_config.r": "4",
        "method_config.target_modules": "query, value",
        "training.num_epochs": "3",
        "training.batch_size": "16",
        "training.learning_rate": "0.002",
        "training.disable_dropout": ["false", "true"],
    }

    response = client.post("/jobs/new", data=form, headers=HTML, follow_redirects=False)

    assert response.status_code == 303
    job = client.get(response.headers["location"].replace("/jobs/", "/api/v1/jobs/")).json()
    expected = JobSpec.model_validate(
        {
            "name": "from the form",
            "dataset_id": dataset["id"],
            "method": "lora",
            "method_config": {"r": 4, "target_modules": ["query", "value"]},
            "training": {"num_epochs": 3, "batch_size": 16, "learning_rate": 0.002, "disable_dropout": True},
        }
    )
    # the API stores the spec with its auto settings resolved (docs/defaults.md): the same for both
    from_api = client.post("/api/v1/jobs", json=expected.model_dump(mode="json")).json()
    assert job["spec"] == from_api["spec"]
    assert job["spec"]["training"]["num_epochs"] == 3 and job["spec"]["training"]["learning_rate"] == 0.002


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"training.batch_size": "0"}, "training.batch_size"),
        ({"training.learning_rate": "fast"}, "training.learning_rate"),
        ({"method_config.r": "0"}, "method_config.r"),
        ({"training.num_epochs": "", "training.max_steps": ""}, "training"),
        ({"label_column": "stars"}, "label_column"),  # checked by the service against the dataset
        ({"training.max_length": "4096"}, "training.max_length"),  # beyond the model's positions (service)
    ],
)
def test_bad_form_post_is_a_422_naming_the_field_and_stores_nothing(
    client: TestClient, form: dict[str, str], field: str
) -> None:
    dataset = upload(client)

    response = client.post("/jobs/new", data={"dataset_id": str(dataset["id"]), **form}, headers=HTML)

    assert response.status_code == 422
    assert f"<code>{field}</code>:" in response.text
    assert f'data-field="{field}"' in response.text or field == "training"
    assert job_count(client) == 0
    # the form comes back with what was typed
    for name, value in form.items():
        if value:  # an input keeps its text; a column dropdown keeps the value as a chosen option
            assert (
                f'name="{name}" value="{value}"' in response.text
                or f'<option value="{value}" selected>' in response.text
            )


def test_form_post_without_a_dataset_names_dataset_id(client: TestClient) -> None:
    response = client.post("/jobs/new", data={}, headers=HTML)

    assert response.status_code == 422
    assert "<code>dataset_id</code>" in response.text
    assert job_count(client) == 0


# ---- dataset upload and the demo ---------------------------------------------------------------


def test_upload_form_redirects_to_the_profile(client: TestClient) -> None:
    files = {"file": ("reviews.csv", io.BytesIO(CSV), "text/csv")}

    response = client.post("/datasets", files=files, data={"name": "Reviews"}, follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/datasets/1"
    assert client.get("/api/v1/datasets/1").json()["name"] == "Reviews"


def test_upload_form_through_htmx_redirects_with_a_header(client: TestClient) -> None:
    files = {"file": ("reviews.csv", io.BytesIO(CSV), "text/csv")}

    response = client.post("/datasets", files=files, headers=HTMX, follow_redirects=False)

    assert response.status_code == 200
    assert response.headers["hx-redirect"] == "/datasets/1"


@pytest.mark.parametrize(
    ("filename", "content", "status", "message"),
    [
        ("notes.docx", b"hello", 422, "Unsupported file type"),
        ("empty.csv", b"text,label\n", 422, "no data rows"),
        ("ragged.csv", b"text,label\nfine,1,extra\n", 422, "Row 1"),
    ],
)
def test_upload_form_errors_are_readable_fragments_and_pages(
    client: TestClient, filename: str, content: bytes, status: int, message: str
) -> None:
    fragment = client.post("/datasets", files={"file": (filename, content)}, headers=HTMX)
    page = client.post("/datasets", files={"file": (filename, content)}, headers=HTML)

    assert fragment.status_code == status and message in fragment.text and "<nav>" not in fragment.text
    assert page.status_code == status and message in page.text and 'id="upload-form"' in page.text
    assert client.get("/api/v1/datasets").json()["count"] == 0


def test_upload_form_without_a_file_asks_for_one(client: TestClient) -> None:
    response = client.post("/datasets", data={"name": "x"}, headers=HTMX)

    assert response.status_code == 422
    assert "Choose a file" in response.text


def test_duplicate_upload_is_a_409_in_the_form(client: TestClient) -> None:
    upload(client)

    response = client.post("/datasets", files={"file": ("again.csv", CSV)}, headers=HTMX)

    assert response.status_code == 409 and "already uploaded as dataset 1" in response.text


def test_demo_endpoint_creates_the_dataset_once(client: TestClient) -> None:
    first = client.post("/api/v1/datasets/demo")
    second = client.post("/api/v1/datasets/demo")

    assert first.status_code == 201
    assert first.json()["row_count"] == 1000 and first.json()["columns"] == ["text", "label"]
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    assert client.get("/api/v1/datasets").json()["count"] == 1


def test_demo_button_loads_the_demo_and_opens_it(client: TestClient) -> None:
    response = client.post("/datasets/demo", follow_redirects=False)

    assert response.status_code == 303 and response.headers["location"] == "/datasets/1"
    assert client.post("/datasets/demo", follow_redirects=False).headers["location"] == "/datasets/1"


def test_demo_file_is_the_first_thousand_rows_of_sst2() -> None:
    shared = (PROJECT_ROOT.parent / "shared" / "data" / "sst2" / "train.csv").read_text(encoding="utf-8")
    demo = DEMO_DATASET_PATH.read_text(encoding="utf-8")

    # the same rows, with the labels 0/1 written as negative/positive
    named = [
        line.removesuffix(",0") + ",negative"
        if line.endswith(",0")
        else line.removesuffix(",1") + ",positive"
        for line in shared.splitlines()[1:1001]
    ]
    assert demo.splitlines() == ["text,label", *named]


def test_delete_from_the_page_goes_back_to_the_list(client: TestClient) -> None:
    dataset = upload(client)

    response = client.post(f"/datasets/{dataset['id']}/delete", headers=HTMX)

    assert response.headers["hx-redirect"] == "/datasets"
    assert client.get("/api/v1/datasets").json()["count"] == 0


def test_predict_fragment_reports_a_missing_adapter(client: TestClient) -> None:
    response = client.post("/adapters/7/predict", data={"text": "fine"}, headers=HTMX)

    assert response.status_code == 404 and "Adapter 7 does not exist" in response.text


def test_web_app_does_not_import_torch() -> None:
    code = "import app.main, sys; assert not {'torch', 'transformers', 'peft'} & set(sys.modules)"

    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=60)

    # and the web app loads nothing of the worker at start-up (its lazy imports: tests/test_layout.py)
    code = "import app.main, sys; loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'worker'); assert not loaded, loaded"
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=60)

    # the shared core loads no web framework and no torch, so the worker imports it as cheaply as the web does
    core = sorted(p.stem for p in (PROJECT_ROOT / "app" / "core").glob("*.py") if p.stem != "__init__")
    heavy = {"fastapi", "starlette", "sse_starlette", "torch", "transformers", "peft", "bitsandbytes", "trl"}
    code = (
        f"import importlib, sys; [importlib.import_module('app.core.' + m) for m in {core!r}]; "
        f"loaded = sorted({heavy!r} & set(sys.modules)); assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True, timeout=60)
