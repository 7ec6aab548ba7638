"""The studio's REST client on the command line: ``peft-studio datasets|jobs|adapters|tokens ...``.

Every command talks to a running studio over HTTP (``--url`` / ``PEFT_STUDIO_URL``) with an API token
(``--token`` / ``PEFT_STUDIO_TOKEN``); nothing here touches the database or imports torch. Output is a rich
table for people, or JSON with ``--json`` for scripts.

Exit codes (also in docs/cli.md):

- 0: done (``jobs watch``: the job succeeded)
- 1: ``jobs watch``: the job failed
- 2: bad command line, or a spec file that cannot be read
- 3: ``jobs watch``: the job was cancelled
- 4: the studio refused the request (4xx: bad input, not found, not allowed, conflict)
- 5: the studio could not be reached, or answered with a server error (5xx)
- 6: ``jobs watch --timeout`` ran out before the job finished
"""

import json
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_JOB_CANCELLED = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5
EXIT_TIMEOUT = 6

DEFAULT_URL = "http://127.0.0.1:8000"

console = Console()
errors = Console(stderr=True)

datasets_app = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Create, list, watch, cancel and resume fine-tuning jobs.", no_args_is_help=True)
adapters_app = typer.Typer(help="List and download adapters.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens.", no_args_is_help=True)

Url = Annotated[str, typer.Option("--url", envvar="PEFT_STUDIO_URL", help="The studio's address.")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="PEFT_STUDIO_TOKEN", help="An API token (create one on /tokens)."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table (for scripts).")]


def fail(message: str, code: int) -> NoReturn:
    """Print an error to stderr and exit with ``code``."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


class Studio:
    """A small client of the studio's REST API that turns failures into exit codes."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request; the JSON answer (None for 204), or exit with 4 (refused) / 5 (unreachable, 5xx)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(
                f"cannot reach the studio at {self.http.base_url} ({type(exc).__name__}: {exc})",
                EXIT_UNREACHABLE,
            )
        return self._answer(response)

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
                detail = body.get("detail") or body.get("error", {}).get("message") or body
            except ValueError:
                detail = response.text[:500]
            code = EXIT_REFUSED if response.status_code < 500 else EXIT_UNREACHABLE
            fail(
                f"{response.request.method} {response.request.url.path} -> {response.status_code}: {detail}",
                code,
            )
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def download(self, path: str, target: Path) -> int:
        """Stream a file to ``target`` (written to a .part file first); returns its size."""
        partial = target.with_name(target.name + ".part")
        try:
            with self.http.stream("GET", path, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    self._answer(response)
                size = 0
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        size += len(chunk)
        except httpx.HTTPError as exc:
            partial.unlink(missing_ok=True)
            fail(f"download failed ({type(exc).__name__}: {exc})", EXIT_UNREACHABLE)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return size


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("—" if value is None else str(value) for value in row))
    console.print(table)


# ---- datasets ---------------------------------------------------------------------------------


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="CSV, TSV, JSON or JSONL.")
    ],
    url: Url = DEFAULT_URL,
    token: Token = None,
    name: Annotated[str | None, typer.Option(help="Display name; default the file name.")] = None,
    as_json: AsJson = False,
) -> None:
    """Upload a dataset; prints its id (validated and profiled by the studio)."""
    with file.open("rb") as stream:
        data = {"name": name} if name else {}
        dataset = Studio(url, token, timeout=600).request(
            "POST", "/api/v1/datasets", files={"file": (file.name, stream)}, data=data
        )
    if as_json:
        _print_json(dataset)
    else:
        console.print(
            f"dataset {dataset['id']}: {dataset['name']} ({dataset['row_count']} rows, "
            f"columns {', '.join(dataset['columns'])})"
        )


@datasets_app.command("list")
def datasets_list(url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Datasets, newest first."""
    page = Studio(url, token).request("GET", "/api/v1/datasets")
    if as_json:
        _print_json(page["data"])
        return
    rows = [
        [d["id"], d["name"], d["format"], d["row_count"], ", ".join(d["columns"][:6])] for d in page["data"]
    ]
    _table(f"Datasets ({page['count']})", ["id", "name", "format", "rows", "columns"], rows)


# ---- jobs -------------------------------------------------------------------------------------


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read the spec file {path}: {exc}", EXIT_USAGE)
    if not isinstance(data, dict):
        fail(
            f"the spec file {path} must hold a mapping (a JSON object), not {type(data).__name__}", EXIT_USAGE
        )
    return data


def _set_path(spec: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = spec
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            fail(f"--set {dotted}: {key!r} is not a section of the spec", EXIT_USAGE)
        node = child
    node[keys[-1]] = value


def build_spec(
    spec_file: Path | None, overrides: dict[str, Any], assignments: list[str] | None
) -> dict[str, Any]:
    """The job spec: the file's (if any), then the flags, then ``--set key.path=value`` (values read as YAML)."""
    spec = _read_spec(spec_file) if spec_file else {}
    for dotted, value in overrides.items():
        if value is not None:
            _set_path(spec, dotted, value)
    for assignment in assignments or []:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            fail(f"--set {assignment!r}: write it as key.path=value, e.g. training.max_steps=20", EXIT_USAGE)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_path(spec, key.strip(), value)
    return spec


@jobs_app.command("create")
def jobs_create(
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", "-f", exists=True, dir_okay=False, help="A job spec as YAML or JSON."),
    ] = None,
    dataset_id: Annotated[int | None, typer.Option(help="The training dataset.")] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Bundled model, local folder or cached hub id.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="sequence-classification or causal-lm.")] = None,
    method: Annotated[str | None, typer.Option(help="lora, qlora, ia3, ... (GET /api/v1/methods).")] = None,
    method_config: Annotated[
        str | None, typer.Option(help="The method's settings as JSON, e.g. '{\"r\": 8}'.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    assignments: Annotated[
        list[str] | None, typer.Option("--set", help="Any spec field: key.path=value (repeatable).")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Then watch it until it finishes (exit code as watch).")
    ] = False,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Create a job from flags and/or a YAML/JSON spec file (flags win); prints the job id."""
    config: Any = None
    if method_config is not None:
        try:
            config = json.loads(method_config)
        except ValueError as exc:
            fail(f"--method-config is not valid JSON: {exc}", EXIT_USAGE)
    overrides = {
        "dataset_id": dataset_id,
        "base_model": base_model,
        "task": task,
        "method": method,
        "method_config": config,
        "name": name,
        "training.max_steps": max_steps,
        "training.num_epochs": epochs,
        "training.batch_size": batch_size,
        "training.learning_rate": learning_rate,
    }
    spec = build_spec(spec_file, overrides, assignments)
    studio = Studio(url, token)
    job = studio.request("POST", "/api/v1/jobs", json=spec)
    if as_json:
        _print_json(job)
    else:
        console.print(f"job {job['id']} queued: {job['name']} ({job['method']} on {job['base_model']})")
    if watch:
        raise typer.Exit(watch_job(studio, int(job["id"]), interval=1.0, timeout=None, quiet=as_json))


@jobs_app.command("list")
def jobs_list(
    url: Url = DEFAULT_URL,
    token: Token = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: AsJson = False,
) -> None:
    """Jobs, newest first."""
    page = Studio(url, token).request("GET", "/api/v1/jobs", params={"limit": limit})
    if as_json:
        _print_json(page["data"])
        return
    rows = [
        [j["id"], j["name"], j["status"], j["method"], f"{100 * j['progress']:.0f}%", j.get("adapter_id")]
        for j in page["data"]
    ]
    _table(f"Jobs ({page['count']})", ["id", "name", "status", "method", "progress", "adapter"], rows)


def _latest(points: list[dict[str, Any]], split: str) -> float | None:
    for point in reversed(points):
        if point["split"] == split and "loss" in point["values"]:
            return float(point["values"]["loss"])
    return None


def watch_job(
    studio: Studio, job_id: int, interval: float, timeout: float | None, quiet: bool = False
) -> int:
    """Follow a job with a live progress bar (step, latest train and eval loss) until it ends; its exit code."""
    deadline = None if timeout is None else time.monotonic() + timeout
    cursor, train_loss, eval_loss = 0, None, None
    columns = (
        TextColumn("[bold]job {task.fields[job]}[/] {task.fields[status]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[where]}"),
        TextColumn("loss {task.fields[loss]}  eval {task.fields[eval]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=errors, disable=quiet) as progress:
        bar = progress.add_task("train", total=None, job=job_id, status="…", where="", loss="—", eval="—")
        while True:
            job = studio.request("GET", f"/api/v1/jobs/{job_id}")
            points = studio.request("GET", f"/api/v1/jobs/{job_id}/metrics", params={"after": cursor})
            if points:
                cursor = points[-1]["id"]
                train_loss = _latest(points, "train") or train_loss
                eval_loss = _latest(points, "eval") or eval_loss
            # A queued job has no steps yet: its place in the queue (and why it waits) instead of "step 0/?"
            # with a pulsing, full-looking bar; the empty bar of total 1 says nothing has run.
            queued = job["status"] == "queued"
            where = f"step {job['current_step']}/{job['total_steps'] or '?'}"
            if queued:
                where = f"queued (position {job.get('queue_position') or '?'})"
                where += f": {job['waiting_reason']}" if job.get("waiting_reason") else ""
            progress.update(
                bar,
                completed=0 if queued else job["current_step"],
                total=1 if queued else job["total_steps"],
                status="" if queued else job["status"],
                where=where,
                loss=f"{train_loss:.4f}" if train_loss is not None else "—",
                eval=f"{eval_loss:.4f}" if eval_loss is not None else "—",
            )
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if deadline is not None and time.monotonic() > deadline:
                errors.print(f"job {job_id} is still {job['status']} after {timeout:g} s; stopped watching")
                return EXIT_TIMEOUT
            time.sleep(interval)
    status = job["status"]
    if not quiet:
        losses = f" (train loss {train_loss:.4f}" if train_loss is not None else ""
        if losses:
            losses += f", eval loss {eval_loss:.4f})" if eval_loss is not None else ")"
        adapter = f"; adapter {job['adapter_id']}" if job.get("adapter_id") else ""
        error = f": {job['error']}" if job.get("error") else ""
        console.print(f"job {job_id} {status}{losses}{adapter}{error}")
    return {"succeeded": EXIT_OK, "failed": EXIT_JOB_FAILED}.get(status, EXIT_JOB_CANCELLED)


@jobs_app.command("watch")
def jobs_watch(
    job_id: Annotated[int, typer.Argument(help="The job to follow.")],
    url: Url = DEFAULT_URL,
    token: Token = None,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 6).")] = None,
) -> None:
    """Show a live progress bar with the latest loss and eval loss; exit 0 succeeded, 1 failed, 3 cancelled."""
    raise typer.Exit(watch_job(Studio(url, token), job_id, interval, timeout))


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Cancel a queued or running job."""
    job = Studio(url, token).request("POST", f"/api/v1/jobs/{job_id}/cancel")
    _print_json(job) if as_json else console.print(f"job {job_id}: {job['status']}")


@jobs_app.command("resume")
def jobs_resume(job_id: int, url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Resume a failed or cancelled job from its newest checkpoint."""
    job = Studio(url, token).request("POST", f"/api/v1/jobs/{job_id}/resume")
    _print_json(job) if as_json else console.print(f"job {job_id}: {job['status']}")


# ---- adapters ---------------------------------------------------------------------------------


@adapters_app.command("list")
def adapters_list(url: Url = DEFAULT_URL, token: Token = None, as_json: AsJson = False) -> None:
    """Adapters of succeeded jobs, newest first."""
    page = Studio(url, token).request("GET", "/api/v1/adapters")
    if as_json:
        _print_json(page["data"])
        return
    rows = [
        [
            a["id"],
            a["job_id"],
            a["name"],
            a["method"],
            a["task"],
            _size(a["size_bytes"]),
            _headline(a["task"], a["metrics"]),
        ]
        for a in page["data"]
    ]
    _table(f"Adapters ({page['count']})", ["id", "job", "name", "method", "task", "size", "eval"], rows)


def _size(size: int | None) -> str | None:
    """1536 -> '1.5 KB' (the web pages' units)."""
    if size is None:
        return None
    value = float(size)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _headline(task: str, metrics: dict[str, Any]) -> str | None:
    """The metric a person looks at first, labelled (accuracy for classification, perplexity for a causal LM),
    instead of the raw metrics JSON; ``--json`` still has them all."""
    keys = ("accuracy", "f1_macro", "loss") if task == "sequence-classification" else ("perplexity", "loss")
    shown = [
        f"{key.replace('_', ' ')} {metrics[key]:.4g}"
        for key in keys
        if isinstance(metrics.get(key), int | float)
    ]
    return " · ".join(shown[:2]) or None


@adapters_app.command("download")
def adapters_download(
    adapter_id: int,
    url: Url = DEFAULT_URL,
    token: Token = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write the zip.")] = None,
    merged: Annotated[
        bool, typer.Option(help="The base model with the adapter merged in (LoRA family).")
    ] = False,
) -> None:
    """Download an adapter as a zip that peft + transformers load directly."""
    name = f"merged-{adapter_id}.zip" if merged else f"adapter-{adapter_id}.zip"
    target = output or Path(name)
    if target.is_dir():
        target = target / name
    path = f"/api/v1/adapters/{adapter_id}/merged" if merged else f"/api/v1/adapters/{adapter_id}/download"
    size = Studio(url, token).download(path, target)
    console.print(f"wrote {target} ({size:,} bytes)")


# ---- tokens -----------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="What the token is for, e.g. 'laptop CLI'.")],
    url: Url = DEFAULT_URL,
    token: Token = None,
    expires_days: Annotated[float | None, typer.Option(help="Days until it stops working.")] = None,
    as_json: AsJson = False,
) -> None:
    """Create an API token for yourself; it is printed once (stdout holds only the token unless --json)."""
    created = Studio(url, token).request(
        "POST", "/api/v1/tokens", json={"name": name, "expires_days": expires_days}
    )
    if as_json:
        _print_json(created)
    else:
        typer.echo(created["token"])


def mount(cli: typer.Typer) -> None:
    """Add the client command groups to the ``peft-studio`` app."""
    cli.add_typer(datasets_app, name="datasets")
    cli.add_typer(jobs_app, name="jobs")
    cli.add_typer(adapters_app, name="adapters")
    cli.add_typer(tokens_app, name="tokens")
