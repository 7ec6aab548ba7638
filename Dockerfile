# One image for every studio process: `peft-studio migrate`, `serve` (web) and `worker`.
# Build: docker build -t peft-studio .   (docker-compose.yml builds it for you)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /studio

# Dependencies first (pinned in pyproject.toml, torch included), so a code change does not reinstall them.
# The install is editable because the app finds alembic.ini, migrations/, templates/ and static/ beside
# its package folders (app/core/db.py: PROJECT_ROOT).
COPY pyproject.toml README.md ./
RUN mkdir app worker \
    && touch app/__init__.py worker/__init__.py \
    && pip install -e . \
    && rm -rf app worker

COPY alembic.ini ./
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
COPY worker ./worker
COPY app ./app

EXPOSE 8000
CMD ["peft-studio", "serve", "--host", "0.0.0.0", "--workers", "0"]
