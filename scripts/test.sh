#!/usr/bin/env bash
# Install everything the test suite needs and run it: lint (ruff), format check, types (mypy), pytest.
#
#   scripts/test.sh                  # the whole suite
#   scripts/test.sh -k datasets      # arguments go to pytest
#
# The suite talks to real services: PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (started
# here when they are down) and Debian's Chromium (installed here when missing). With CI=true a missing
# service fails the tests instead of skipping them (tests/conftest.py).
set -euo pipefail

# shellcheck source=scripts/serve.sh
source "$(dirname "${BASH_SOURCE[0]}")/serve.sh"
cd "$STUDIO_ROOT"

port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for_port() {
    local name="$1" host="$2" port="$3"
    for _ in $(seq 1 60); do
        port_open "$host" "$port" && return 0
        sleep 0.5
    done
    echo "!! $name did not come up on $host:$port" >&2
    return 1
}

ensure_postgres() {
    port_open 127.0.0.1 5432 && return 0
    echo "==> starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start || true
    wait_for_port PostgreSQL 127.0.0.1 5432 || true
}

ensure_redis() {
    port_open 127.0.0.1 6379 && return 0
    echo "==> starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for_port Redis 127.0.0.1 6379 || true
}

ensure_chromium() {
    [[ -x /usr/bin/chromium ]] && return 0
    if [[ "$(id -u)" != 0 ]]; then
        echo "!! /usr/bin/chromium is missing and this is not root: browser tests will skip (or fail with CI=true)" >&2
        return 0
    fi
    echo "==> installing Debian's chromium (apt-get)"
    # Never `playwright install`: its driver ships in the wheel and the browser is Debian's.
    (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
        || echo "!! apt-get could not install chromium: browser tests will skip (or fail with CI=true)" >&2
}

ensure_venv dev
ensure_chromium
# A service that stays down is reported by the tests that need it (skip locally, failure with CI=true).
ensure_postgres
ensure_redis

export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
PATH="$VENV/bin:$PATH"

# Every step runs even when an earlier one fails, so one run shows every problem; any failure exits 1.
failed=()
step() {
    local name="$1"
    shift
    echo "==> $name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

step "ruff check" ruff check .
step "ruff format --check" ruff format --check .
step "mypy" mypy app worker

echo "==> pytest $*"
set +e
pytest -ra "$@"
pytest_status=$?
set -e
case "$pytest_status" in
    0) ;;
    5) echo "!! pytest collected no tests (check the -k expression or the paths given)" >&2
       failed+=("pytest: no tests collected") ;;
    *) failed+=("pytest (exit status $pytest_status)") ;;
esac

if ((${#failed[@]})); then
    printf '!! failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "==> all checks passed"
