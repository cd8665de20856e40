#!/usr/bin/env bash
# One command that verifies and measures hcx's GPU path on a machine with NVIDIA GPUs, in
# about 10 minutes, and writes a Markdown table (default bench/gpu_check.md):
#
#   1. environment: GPU, driver, torch, megatron-core, Transformer Engine, CUDA;
#   2. the tiny recipe for 20 steps in bf16 over NCCL, against its own fp32 run (every
#      step's loss within TOLERANCE relative), and at TP=2 when 2 GPUs exist;
#   3. recipes/bench-1b.yaml tokens/s and MFU: the hcx engine against a Hugging Face loop
#      in the same run (bench/train_throughput.py);
#   4. checkpoint save time, synchronous against asynchronous (checkpoint.async_save,
#      only when this hcx has that option);
#   5. evaluation examples/s against lm-eval's HF backend (bench/eval_throughput.py) and
#      generation tokens/s against transformers (bench/generate_throughput.py), on the
#      tiny model.
#
# Offline installs: wheels placed in bench/wheels/ (megatron-core, and whatever else this
# machine lacks, for its Python) are installed with pip --no-index before anything runs.
#
#   bash bench/gpu_check.sh              # run it
#   bash bench/gpu_check.sh --dry-run    # print every command it would run, run nothing
#   bash bench/gpu_check.sh --out FILE   # the table's path
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
OUT="$HERE/gpu_check.md"
WORK="${GPU_CHECK_WORK:-/tmp/hcx-gpu-check}"
TOLERANCE=0.03        # bf16 vs fp32 (and TP=2 vs TP=1): relative loss difference per step
STEPS=20
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --work) WORK="$2"; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# The number of GPUs decides the TP=2 step; a dry run on a CPU machine plans for 2.
if command -v nvidia-smi >/dev/null 2>&1; then
    GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
else
    GPUS=0
fi
[ "$DRY" = 1 ] && [ "$GPUS" -lt 2 ] && GPUS=2

# Data: the shared data folder when present, else Python's own sources (always there).
DATA_ROOT="${HCX_DATA_DIR:-$ROOT/../shared/data}"
if [ -f "$DATA_ROOT/train/pretrain/en_tiny_shakespeare/train.jsonl" ]; then
    SOURCES='data.sources=[{name: en, path: "data://train/pretrain/en_tiny_shakespeare/train.jsonl"}]'
else
    SOURCES='data.sources=[{name: code, language: code, path: "python://stdlib", include: "json/*.py"}]'
fi
TINY=(recipes/tiny.yaml "$SOURCES" data.eval_every=0 data.cache_dir="$WORK/cache-tiny"
      train.steps=$STEPS train.warmup_steps=2 checkpoint.save_every=0 logging.progress=false
      logging.log_every=5)
HCX=("$PY" -m hcx.cli)

STEPS_RUN=()   # "name|command" in order
step() { STEPS_RUN+=("$1|$2"); }
q() { printf '%q ' "$@"; }

step install "if ! $PY -c 'import megatron.core' 2>/dev/null; then $PY -m pip install --no-index --find-links $HERE/wheels $HERE/wheels/*.whl; fi"
step environment "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; $PY -c 'import torch, megatron.core as m; print(torch.__version__, torch.version.cuda, m.__version__)'; $PY -c 'import transformer_engine as te; print(te.__version__)'"
step tiny_fp32 "$(q "${HCX[@]}" pretrain "${TINY[@]}" output_dir="$WORK/tiny-fp32" train.precision=fp32)"
step tiny_bf16 "$(q "${HCX[@]}" pretrain "${TINY[@]}" output_dir="$WORK/tiny-bf16" train.precision=bf16)"
if [ "$GPUS" -ge 2 ]; then
    step tiny_bf16_tp2 "$(q "${HCX[@]}" pretrain "${TINY[@]}" output_dir="$WORK/tiny-bf16-tp2" train.precision=bf16 parallel.tp=2 parallel.sequence_parallel=true)"
fi
step train_throughput "$(q "$PY" bench/train_throughput.py recipes/bench-1b.yaml --steps 10 --warmup 3 --json "$WORK/train_throughput.json")"
# Checkpoint save time: 3 steps saving every step against saving at the end only; the
# difference over the 2 extra saves is the time a save holds training up.
SAVE=(recipes/bench-1b.yaml data.cache_dir="$WORK/cache-1b" "$SOURCES" train.steps=3 logging.progress=false)
for mode in sync async; do
    extra=()
    [ "$mode" = async ] && extra=(checkpoint.async_save=true)
    step "save_${mode}_end" "$(q "${HCX[@]}" pretrain "${SAVE[@]}" "${extra[@]}" output_dir="$WORK/save-$mode-end" checkpoint.save_every=0)"
    step "save_${mode}_every" "$(q "${HCX[@]}" pretrain "${SAVE[@]}" "${extra[@]}" output_dir="$WORK/save-$mode-every" checkpoint.save_every=1)"
done
step eval_throughput "$(q "$PY" bench/eval_throughput.py "$WORK/tiny-bf16/checkpoints" --limit 100 --repeats 2 --json "$WORK/eval_throughput.json")"
step generate_throughput "$(q "$PY" bench/generate_throughput.py recipes/tiny.yaml --batch 8 --new-tokens 128 --json "$WORK/generate_throughput.json")"
step report "$(q "$PY" bench/gpu_check_report.py "$WORK" --tolerance $TOLERANCE --out "$OUT")"

if [ "$DRY" = 1 ]; then
    echo "# bench/gpu_check.sh plan: $GPUS GPU(s), work folder $WORK, table -> $OUT"
    echo "# bf16 vs fp32 tolerance: $TOLERANCE relative per step over $STEPS steps"
    echo "# the async save steps run only when checkpoint.async_save exists in hcx.config"
    for s in "${STEPS_RUN[@]}"; do
        echo "[${s%%|*}] ${s#*|}"
    done
    exit 0
fi

cd "$ROOT"
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
HAS_ASYNC="$("$PY" -c 'from hcx.config import CheckpointConfig as C; print(int("async_save" in C.model_fields))' 2>/dev/null || echo 0)"
: > "$WORK/times.tsv"
for s in "${STEPS_RUN[@]}"; do
    name="${s%%|*}"; cmd="${s#*|}"
    if [[ "$name" == save_async_* ]] && [ "$HAS_ASYNC" != 1 ]; then
        echo "== $name: skipped (this hcx has no checkpoint.async_save)"
        printf '%s\tskipped\t\n' "$name" >> "$WORK/times.tsv"
        continue
    fi
    echo "== $name: $cmd"
    t0="$(date +%s%N)"
    bash -c "$cmd" > "$WORK/$name.log" 2>&1
    rc=$?
    t1="$(date +%s%N)"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( (t1 - t0) / 1000000 ))" >> "$WORK/times.tsv"
    tail -3 "$WORK/$name.log"
done
cat "$OUT"
