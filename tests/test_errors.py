"""One error path (app/http/errors.py): a domain error is JSON on the APIs, the error fragment for htmx, the form's
own page for a failed form, and the error page for a browser; pages catch no domain errors themselves."""

import ast
import io
import zipfile
from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError, field_validator

from app.core.errors import StudioError
from app.core.files import receive_upload, zip_folder
from app.http.errors import validation_items
from app.main import create_app
from tests.studio import PROJECT_ROOT

HTML = {"accept": "text/html"}
HTMX = {"accept": "text/html", "hx-request": "true"}
MISSING = "Dataset 999999 does not exist."


def test_an_htmx_request_that_fails_gets_the_error_fragment_with_the_message_and_status(
    client: TestClient,
) -> None:
    # when: the dataset page's htmx delete button, for a dataset that does not exist
    response = client.post("/datasets/999999/delete", headers=HTMX)
    # then: a fragment (not a page, not JSON) with the message, and the 404
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert 'data-testid="error"' in response.text and MISSING in response.text
    assert "<html" not in response.text.lower()


def test_an_htmx_request_for_a_page_without_its_own_error_handling_gets_the_fragment(
    client: TestClient,
) -> None:
    response = client.get("/jobs/999999/events", headers={"hx-request": "true"})  # no Accept: text/html
    assert response.status_code == 404
    assert "Job 999999 does not exist." in response.text and "<html" not in response.text.lower()


def test_the_same_request_without_htmx_gets_the_whole_error_page(client: TestClient) -> None:
    response = client.post("/datasets/999999/delete", headers=HTML)
    assert response.status_code == 404
    assert "<html" in response.text.lower() and "Something went wrong" in response.text
    assert MISSING in response.text


def test_an_api_path_gets_json_even_from_htmx(client: TestClient) -> None:
    for headers in ({}, HTMX):
        response = client.delete("/api/v1/datasets/999999", headers=headers)
        assert response.status_code == 404
        assert response.json() == {"detail": MISSING}


def test_a_failed_form_shows_its_page_again_and_htmx_gets_the_fragment(client: TestClient) -> None:
    # when: the tokens form without a name
    page = client.post("/tokens", data={"name": "  "}, headers=HTML)
    fragment = client.post("/tokens", data={"name": "  "}, headers=HTMX)
    # then: the tokens page again with the message (PageError), or the fragment for htmx; the same 422
    message = "Give the token a name of 1 to 100 characters"
    assert page.status_code == fragment.status_code == 422
    assert message in page.text and 'name="name"' in page.text and "<html" in page.text.lower()
    assert message in fragment.text and "<html" not in fragment.text.lower()


def test_validation_errors_become_messages_once() -> None:
    class Form(BaseModel):
        rank: int

        @field_validator("rank")
        @classmethod
        def positive(cls, value: int) -> int:
            if value <= 0:
                raise ValueError("must be more than 0")
            return value

    try:
        Form.model_validate({"rank": 0})
    except ValidationError as exc:
        assert validation_items(exc.errors(), "form") == [{"field": "rank", "message": "must be more than 0"}]
    body_error = {"type": "missing", "loc": ("body",), "msg": "Field required"}
    assert validation_items([body_error]) == [{"field": "body", "message": "Field required"}]


def test_one_handler_answers_domain_errors() -> None:
    app = create_app(migrate=False)
    assert app.exception_handlers[StudioError].__module__ == "app.http.errors"


# Handlers that show a service's message inside a 200 fragment (the job form's live token lengths and
# estimate): the message is their content, not an error answer, so they keep their own except.
MESSAGE_AS_CONTENT = {
    ("app/web/pages.py", "dataset_lengths"),
    ("app/web/pages.py", "job_form_lengths"),
    ("app/web/pages.py", "job_form_estimate"),
}


def test_page_handlers_do_not_catch_domain_errors() -> None:
    catching = set()
    for path in sorted((PROJECT_ROOT / "app" / "web").glob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and "StudioError" in ast.unparse(
                    node.type or ast.Name("")
                ):
                    catching.add((str(path.relative_to(PROJECT_ROOT)), function.name))
    assert catching - {("app/web/render.py", "form_errors")} == MESSAGE_AS_CONTENT


def test_an_upload_past_the_cap_stops_and_a_folder_zips_under_its_root(tmp_path: Path) -> None:
    target = tmp_path / "upload"
    assert receive_upload(io.BytesIO(b"x" * 10), target, limit=10) == 10
    try:
        receive_upload(io.BytesIO(b"x" * 11), target, limit=10, what="The archive")
    except StudioError as exc:
        assert exc.status_code == 413 and exc.message.startswith("The archive is larger")
    else:
        raise AssertionError("an upload past the cap was kept")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    with zipfile.ZipFile(zip_folder(folder, tmp_path / "out.zip", root="job-1")) as archive:
        assert archive.namelist() == ["job-1/a.txt", "job-1/sub/b.txt"]
    temporary = zip_folder(folder, prefix="test-")
    try:
        with zipfile.ZipFile(temporary) as archive:
            assert archive.namelist() == ["a.txt", "sub/b.txt"]
    finally:
        temporary.unlink()
