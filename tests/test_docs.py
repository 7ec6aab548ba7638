"""The documentation keeps up with the code: every setting and API route is documented, links resolve,
the compose file is well-formed, and the two commands are valid shell."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts

from app.core.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOCS = PROJECT_ROOT / "docs"
COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
SCRIPTS = [
    PROJECT_ROOT / "scripts" / "serve.sh",
    PROJECT_ROOT / "scripts" / "test.sh",
    PROJECT_ROOT / ".ci" / "run",
]
IGNORED_METHODS = {"HEAD", "OPTIONS"}


def api_routes() -> list[str]:
    """``METHOD /path`` of every route of the app under /api/."""
    from app.main import create_app

    found: set[str] = set()
    for route in iter_route_contexts(create_app(migrate=False).routes):
        path = route.path or ""
        if path.startswith("/api/"):
            found.update(f"{method} {path}" for method in (route.methods or set()) - IGNORED_METHODS)
    return sorted(found)


def test_every_setting_is_in_the_configuration_doc() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")

    missing = [f"PEFT_STUDIO_{name.upper()}" for name in Settings.model_fields]
    missing = [variable for variable in missing if f"`{variable}`" not in text]

    assert not missing, f"add these settings to docs/configuration.md: {missing}"


def test_every_api_route_is_in_the_api_doc() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    routes = api_routes()
    assert len(routes) > 10, routes  # the walk over the app's routes found the API at all

    missing = [route for route in routes if f"`{route}`" not in text]

    assert not missing, f"document these routes in docs/api.md (as `METHOD /path`): {missing}"


def test_the_api_doc_names_no_route_that_does_not_exist() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^#+ `((?:GET|POST|PUT|PATCH|DELETE) /api/\S+)`", text, flags=re.MULTILINE))

    stale = sorted(documented - set(api_routes()))

    assert not stale, f"docs/api.md documents routes the app does not have: {stale}"


@pytest.mark.parametrize(
    "document", ["README.md", *sorted(str(p.relative_to(PROJECT_ROOT)) for p in DOCS.glob("*.md"))]
)
def test_relative_links_resolve(document: str) -> None:
    source = PROJECT_ROOT / document
    text = source.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)

    broken = []
    for target in targets:
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or a heading of this page
        if not (source.parent / target.split("#", 1)[0]).exists():
            broken.append(target)

    assert not broken, f"{document} links to files that do not exist: {broken}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_scripts_are_executable_valid_bash(script: Path) -> None:
    assert script.stat().st_mode & 0o111, f"{script} is not executable"

    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


def _docker_compose() -> list[str] | None:
    """The compose command, if this machine has one (the client is enough: `config` needs no engine)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_file_is_valid_for_docker_compose() -> None:
    command = _docker_compose()
    if command is None:
        pytest.skip("the docker compose plugin is not installed; test_compose_file_structure checks the file")

    # the file refuses to start without a real secret; any value satisfies `config`
    env = {**os.environ, "PEFT_STUDIO_SECRET_KEY": "compose-config-check"}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
    )

    assert result.returncode == 0, result.stderr


def _compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def test_compose_file_structure() -> None:
    services = _compose()["services"]

    # the scale-out stack: database, broker, object store, a one-shot migration, web and a GPU worker
    assert {"postgres", "redis", "minio", "migrate", "web", "worker"} <= set(services)
    assert "migrate" in " ".join(services["migrate"]["command"])
    assert services["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "--workers 0" in " ".join(services["web"]["command"])
    assert "worker" in services["worker"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    for name in ("migrate", "web", "worker"):
        environment = _environment(services[name])
        assert environment["PEFT_STUDIO_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert environment["PEFT_STUDIO_BROKER_URL"].startswith("redis://"), name


def test_compose_sets_only_real_settings() -> None:
    services = _compose()["services"]
    known = {f"PEFT_STUDIO_{name.upper()}" for name in Settings.model_fields}

    unknown = sorted(
        {
            name
            for service in services.values()
            for name in _environment(service)
            if name.startswith("PEFT_STUDIO_")
        }
        - known
    )

    assert not unknown, (
        f"docker-compose.yml sets variables that app/core/settings.py does not read: {unknown}"
    )


def test_dockerfile_installs_the_project_on_python_slim() -> None:
    text = (PROJECT_ROOT / "Dockerfile").read_text(encoding="utf-8")

    assert re.search(r"^FROM python:3\.11-slim", text, flags=re.MULTILINE)
    assert "pip install" in text
