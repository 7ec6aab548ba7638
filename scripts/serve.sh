#!/usr/bin/env bash
# Set up PEFT Studio (first run) and start it on the embedded defaults:
# a SQLite database and a SQLite broker under ./data, one training worker, the bundled base model.
#
#   scripts/serve.sh                       # http://127.0.0.1:8000
#   scripts/serve.sh --host 0.0.0.0 --port 8080 --workers 2
#
# Arguments go to `peft-studio serve`. scripts/test.sh sources this file for ensure_venv.
set -euo pipefail

STUDIO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$STUDIO_ROOT/.venv"
INSTALL_STAMP="$VENV/.peft-studio-install"

# ensure_venv [dev]: create .venv if missing and install the project (pinned, editable) into it.
# pip runs only when pyproject.toml changed since the last install (or the dev extras are newly asked for),
# so a second start takes no time. torch is pinned in pyproject.toml; pip takes that CPU build from this
# machine's disk, so nothing here may ask for an unpinned torch.
ensure_venv() {
    local extras="${1:-}"
    if [[ ! -x "$VENV/bin/python" ]]; then
        echo "==> creating $VENV"
        python3 -m venv "$VENV"
    fi
    local wanted have
    wanted="$(sha256sum "$STUDIO_ROOT/pyproject.toml" | cut -d' ' -f1)"
    have="$(cat "$INSTALL_STAMP" 2>/dev/null || true)"
    # The stamp is "<hash of pyproject.toml> <extras>"; a dev install also serves a plain one.
    if [[ -x "$VENV/bin/peft-studio" && ( "$have" == "$wanted dev" || ( -z "$extras" && "$have" == "$wanted " ) ) ]]; then
        return 0
    fi
    local target="."
    [[ -n "$extras" ]] && target=".[$extras]"
    echo "==> installing PEFT Studio into $VENV (pip install -e '$target'; first run takes a few minutes)"
    rm -f "$INSTALL_STAMP"
    (cd "$STUDIO_ROOT" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target")
    echo "$wanted $extras" >"$INSTALL_STAMP"
}

main() {
    ensure_venv
    cd "$STUDIO_ROOT"
    # Offline by default: base models come from disk (the bundled one, or a cache); Hub downloads are a setting.
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    exec "$VENV/bin/peft-studio" serve "$@"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
