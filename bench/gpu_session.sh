#!/usr/bin/env bash
# One prepared call on a lent GPU machine (issues 21 and 22): everything in ~9 minutes, results under $OUT.
#
#   scripts/gpu_site.sh                       # here, once: the carried packages in .gpu_site (~32 MiB)
#   device run, carry [".gpu_site"]: bash bench/gpu_session.sh [--smoke]
#
# 1. bench/gpu_check.py --issue22 on a TinyLlama-shaped 1.1 B model (studio defaults: padding-free packing,
#    Liger auto; against the hand-written Trainer + peft script; QLoRA and LoRA; sequence 2048, 30 steps);
#    the random model is kept in /tmp/gpu-model-1b for step 2.
# 2. bench/preference.py --gpu on that model: a studio DPO job against the hand-written trl script, without
#    and with trl's Liger-kernel DPO loss (use_liger_kernel), one round each (PREF_REPEAT=2: two, ~1 minute more).
# 3. bench/gpu_check.py --issue22 on a Llama-2-7B-shaped model, batch 2, with what time is left.
# Each step has its own time limit, so one that fails or hangs leaves the others their time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
PY=${PYTHON:-python3}
START=$(date +%s)
left() { echo $((${TOTAL:-570} - ($(date +%s) - START))); }

if [ -d .gpu_site/wheels ] && [ -z "$SMOKE" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_site/wheels/*.whl
    export PYTHONPATH="$PWD/.gpu_site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c 'import torch, transformers, peft, trl, datasets, pyarrow; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__, "datasets", datasets.__version__, "pyarrow", pyarrow.__version__)'
"$PY" -c 'import liger_kernel, triton; print("liger-kernel ok, triton", triton.__version__)' 2>&1 | tail -1

MODEL=/tmp/gpu-model-1b
# PACKING="--packing rows": the studio's batch counts rows of max_length tokens, as the script's blocks do (the
# same tokens per step); the default (auto = padding-free) batches batch_size examples.
PACKING=${PACKING:-}
DPO=.gpu_site/data/dpo_en_demo.json
[ -f "$DPO" ] || DPO=../shared/data/preference/dpo_en_demo.json
# VARIANTS_1B / VARIANTS_7B: studio variants beside the defaults (bench/gpu_check.py --variants); STEP1: seconds
# for step 1; PREF=0 skips step 2.
echo "== step 1: issue 22, 1.1 B ($(left) s left)"
mkdir -p "$OUT/g1b"
STEP1=${STEP1:-200}
timeout "$STEP1" "$PY" bench/gpu_check.py $SMOKE --issue22 --size 1b --budget $((STEP1 - 30)) --model-dir "$MODEL" \
    $PACKING --variants "${VARIANTS_1B:-default,varlen}" --out "$OUT/g1b" >"$OUT/g1b/log.txt" 2>&1
echo "step 1 exit $?"; tail -n 40 "$OUT/g1b/gpu.md" 2>/dev/null
if [ "${PREF:-1}" = "1" ]; then
echo "== step 2: preference (DPO), studio vs trl script, without and with Liger ($(left) s left)"
PREF=(--gpu --base "$MODEL" --data "$DPO" --pairs 240 --held-out 60 --steps 30 --batch-size 8 --max-length 512 --repeat ${PREF_REPEAT:-1})
[ -n "$SMOKE" ] && PREF=(--base "$MODEL" --data "$DPO" --pairs 32 --held-out 16 --steps 2 --batch-size 4 --max-length 128 --repeat 1)
for liger in "" "--liger"; do
    echo "-- preference ${liger:-without Liger}"
    timeout 130 "$PY" bench/preference.py "${PREF[@]}" $liger 2>&1
    echo "preference ${liger:-no-liger} exit $?"
done >"$OUT/pref.txt" 2>&1
grep -E "^\{|^SUMMARY|^preference|Error" "$OUT/pref.txt" | cut -c1-600
fi

REST=$(($(left) - 20))
echo "== step 3: issue 22, 6.7 B ($REST s for it)"
if [ "$REST" -gt 90 ]; then
    mkdir -p "$OUT/g7b"
    rm -rf "$MODEL"
    timeout "$REST" "$PY" bench/gpu_check.py $SMOKE --issue22 --size 7b --batch 2 --budget $((REST - 15)) $PACKING \
        --variants "${VARIANTS_7B:-default,varlen}" --out "$OUT/g7b" >"$OUT/g7b/log.txt" 2>&1
    echo "step 3 exit $?"; tail -n 40 "$OUT/g7b/gpu.md" 2>/dev/null
fi
echo "== done in $(($(date +%s) - START)) s"
