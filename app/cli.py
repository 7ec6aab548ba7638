"""The ``peft-studio`` command: serve the studio, run a worker, migrate the database, make a tiny LM."""

import copy
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app.client import cli as client_cli
from app.supervisor import WorkerSupervisor

cli = typer.Typer(help="PEFT Studio: a web-based fine-tuning studio.", no_args_is_help=True)


def worker_command(queues: str | None = None, concurrency: int = 1, hostname: str | None = None) -> list[str]:
    """The command line that starts one Celery training worker (solo pool: one job at a time).

    Without ``queues`` the worker consumes the queues its hardware matches (worker/hardware.py).
    """
    from worker.hardware import detect

    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app.core.queue:celery_app",
        "worker",
        "--pool=solo",
        f"--concurrency={concurrency}",
        "--loglevel=INFO",
        f"--queues={queues or ','.join(detect().queues())}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        command.append(f"--hostname={hostname}")
    return command


KEEP_ALIVE_SECONDS = 65


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="Training workers to start beside the web app (0: none).")] = 1,
    web_workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Web processes (uvicorn workers) on the one port; the job reaper and the webhook dispatcher run "
            "in one of them.",
        ),
    ] = 1,
) -> None:
    """Start the web app and one training worker on the configured (by default embedded) database and broker.

    The worker is restarted when it dies (with back-off) and ends when serve does, even after kill -9.
    """
    import uvicorn

    from app.core.db import run_migrations
    from app.core.settings import get_settings

    settings = get_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations()
    # Workers are restarted when they die and die with serve; each start gets a unique name (app/supervisor.py).
    supervisor = WorkerSupervisor(workers, command=lambda name: worker_command(hostname=name)).start()

    def stop_and_exit(*_: object) -> None:
        supervisor.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_and_exit)
    typer.echo(f"PEFT Studio on http://{host}:{port}  (data: {settings.resolved_data_dir})")
    _print_login_link(host, port)
    try:
        # One process by default; with --web-workers N uvicorn forks N processes that share the socket
        # (docs/scale-out.md: what one process holds and how many to run).
        uvicorn.run(
            "app.main:app",
            host=host,
            port=port,
            log_level="info",
            workers=web_workers,
            log_config=_log_config(),
            # Longer than clients keep an idle connection (browsers ~60 s, httpx 5 s): with uvicorn's 5 s a
            # client could send its next request just as the server closed the idle connection (a ReadError,
            # ~1 in 3,000 requests under bench/load_gen.py).
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
    finally:
        supervisor.stop()


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, plus the studio's own ``peft_studio.*`` loggers at INFO on the same handler (which
    web process runs the background duties, the supervisor's restarts)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["peft_studio"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


@cli.command()
def worker(
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues to consume; empty: those the hardware matches.")
    ] = None,
    hostname: Annotated[
        str | None, typer.Option(help="Worker name, e.g. gpu1@%h; empty: a unique worker-<random>@<host>.")
    ] = None,
) -> None:
    """Start one extra training worker against the configured broker."""
    # Celery's default name (celery@host) is the same for every worker on a host; names must be unique.
    name = hostname or f"worker-{secrets.token_hex(3)}@%h"
    os.execv(sys.executable, worker_command(queues=queues, hostname=name))


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _print_login_link(host: str, port: int) -> None:
    """Like Jupyter: on this machine (or before the admin has a password) print a one-time sign-in link."""
    from app.core.db import session_scope
    from app.services.accounts import bootstrap_accounts, create_login_token, login_link

    admin = bootstrap_accounts()
    if host not in LOOPBACK_HOSTS and admin.password_hash:
        return  # a shared server: people sign in with passwords; `peft-studio login-link` makes a link on demand
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    with session_scope() as session:
        raw = create_login_token(session, admin)
    typer.echo(f"Open this one-time link to sign in as {admin.username!r}:")
    typer.echo(f"    {login_link(f'http://{shown}:{port}', raw)}")


@cli.command("login-link")
def login_link_command(
    user: Annotated[str | None, typer.Option(help="User name; empty: the admin.")] = None,
    url: Annotated[
        str, typer.Option(help="The studio's address as a browser reaches it.")
    ] = "http://127.0.0.1:8000",
) -> None:
    """Print a one-time link that signs a browser in (for the admin, or another user)."""
    from sqlmodel import col, select

    from app.core.db import run_migrations, session_scope
    from app.core.models import User
    from app.services.accounts import bootstrap_accounts, create_login_token, login_link

    run_migrations()
    bootstrap_accounts()
    with session_scope() as session:
        query = select(User).where(User.username == user) if user else select(User).where(col(User.is_admin))
        account = session.exec(query.order_by(col(User.id))).first()
        if account is None:
            typer.echo(f"no user named {user!r}", err=True)
            raise typer.Exit(1)
        raw = create_login_token(session, account)
        typer.echo(login_link(url, raw))


@cli.command()
def migrate() -> None:
    """Bring the database schema to the newest revision."""
    from app.core.db import run_migrations

    run_migrations()
    typer.echo("database is up to date")


@cli.command("make-tiny-lm")
def make_tiny_lm(
    path: Annotated[Path, typer.Argument(help="Folder to write the model to (created if missing).")],
    corpus: Annotated[
        Path | None,
        typer.Option(help="A dataset file (.json, .jsonl, .csv, .tsv) whose texts train the tokenizer."),
    ] = None,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a tiny random Llama with a trained tokenizer and chat template, to try causal-LM jobs offline."""
    from worker.tiny_lm import corpus_from_file
    from worker.tiny_lm import make_tiny_lm as write_tiny_lm

    texts = corpus_from_file(corpus) if corpus else None
    folder = write_tiny_lm(path, texts, vocab_size=vocab_size, seed=seed)
    typer.echo(f"tiny Llama written to {folder.resolve()}; use it as the base_model of a causal-lm job")


# The REST client's command groups (datasets, jobs, adapters, tokens): app/client/cli.py.
client_cli.mount(cli)


def main() -> None:
    """Entry point of the console script."""
    cli()


if __name__ == "__main__":
    main()
