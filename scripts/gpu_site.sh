#!/usr/bin/env bash
# Rebuild .gpu_site/: what bench/gpu_check.py needs on the lent GPU machine that its image lacks.
#
# The GPU machine has no network and an image with torch 2.11 (CUDA 13.0), transformers 5.17, peft, accelerate,
# tokenizers, safetensors, numpy, psutil, pyyaml, jinja2, httpx, click, ... but not our pins nor the DB layer.
# Everything here is downloaded with pip (binary wheels for CPython $PYVER on manylinux x86_64) and carried:
#   .gpu_site/wheels/*.whl   extracted at run time by `bench/gpu_check.py --site .gpu_site` (keeps the tree small)
#   .gpu_site/bitsandbytes/  unpacked, with only the CUDA 13.0 and CPU libraries kept (43 MB wheel -> ~5 MB)
#   .gpu_site/data/alpaca.json  the alpaca demo set (../shared does not travel)
#
#   scripts/gpu_site.sh                      # .gpu_site for the GPU image (CPython 3.12)
#   PYVER=3.11 scripts/gpu_site.sh /tmp/sim  # the same for this machine's Python, to rehearse in a bare venv
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${1:-.gpu_site}
PYVER=${PYVER:-3.12}
ALPACA=${ALPACA:-../shared/data/alpaca/alpaca_en_demo.json}
PY=${PYTHON:-python3}
WHEELS=(
  transformers==5.23.0 peft==0.21.2
  # issue 22: Liger Kernel (pure Python + Triton, which the CUDA torch image ships)
  liger-kernel==0.8.5
  # issue 21: preference tuning (trl's DPOTrainer and its datasets layer; pyarrow, xxhash, pandas are in the image)
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  sqlmodel==0.0.50 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4 starlette==1.10.0
  # the queue layer, in case the engine's imports reach it (app.core.queue, worker.tasks)
  celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click-didyoumean==0.3.1
  click-repl==0.4.1 click-plugins==1.1.1.2 prompt-toolkit==3.0.53 wcwidth==0.9.4 tzlocal==5.4.5
  # the web and auth layer, in case they do too (app.http.auth, app.http.deps)
  fastapi==0.163.2 opentelemetry-api==1.45.2 argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 cffi==2.1.1
  pycparser==3.12
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64 any; do PLATFORMS+=(--platform "$p"); done
download() {
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$1" "${@:2}" 2>&1 | grep -v "is ignored: it is neither" || true
}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
download "$TMP/wheels" "${WHEELS[@]}"
download "$TMP/bnb" bitsandbytes==0.50.2
test "$(ls "$TMP"/wheels/*.whl | wc -l)" -eq "${#WHEELS[@]}" || { echo "missing wheels" >&2; exit 1; }
rm -rf "$SITE"
mkdir -p "$SITE/wheels" "$SITE/data"
cp "$TMP"/wheels/*.whl "$SITE/wheels/"
"$PY" -m zipfile -e "$TMP"/bnb/bitsandbytes-*.whl "$SITE"
# Keep the CPU library and the one for CUDA 13.0 (torch 2.11+cu130 on the GPU image); drop the other 40 MB.
find "$SITE/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda130.so' -delete
cp "$ALPACA" "$SITE/data/alpaca.json"
cp "${DPO:-../shared/data/preference/dpo_en_demo.json}" "$SITE/data/dpo_en_demo.json"
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$EXCLUDE")"
if [ "$SITE" = .gpu_site ] && ! grep -qx '/.gpu_site/' "$EXCLUDE" 2>/dev/null; then echo '/.gpu_site/' >>"$EXCLUDE"; fi
du -sb "$SITE" | awk '{printf "%s: %.1f MiB\n", $2, $1/1048576}'
