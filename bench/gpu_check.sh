#!/usr/bin/env bash
# The GPU checks in one go (at most 9 min 20 s: the parts' limits), each part under its own time limit, most wanted first:
#   1. the fine-tune's memory and step time at SD-2-base's size (512², bf16): batch 1 and 2, the defaults
#      (batch 8), the consistency reward on every sample and at its default t <= 200 (bench/realsize_memory.py)
#   2. the CUDA tests, which fail rather than skip without a usable GPU (tests/test_gpu.py)
#   3. mask-conditioned sampling against joint sampling at SD-2-base's size (bench/mask_mode_throughput.py)
#   4. generation throughput at SD-2-base's size against image-only SD-2 (bench/gpu_throughput.py)
# Every part writes its log and its last line (one JSON object) to OUT (default ./gpu-check):
#   realsize.json, tests.json, mask_mode.json, gpu_throughput.json   the figures
#   *.log, nvidia_smi.txt                                             the whole output, the GPU and its driver
#   summary.json                                                      each part's exit status and seconds
#
#   bash bench/gpu_check.sh [OUT]
# GPU_CHECK_PARTS: the parts to run (default all four: "realsize tests mask_mode gpu_throughput");
# PYTHON: the interpreter (default .venv/bin/python); BENCH_ARGS, REALSIZE_ARGS, MASK_ARGS: other settings
# of the throughput, memory and mask-mode benches (a narrow CPU check of this script:
#   BENCH_ARGS="--width 16 --resolution 128 --steps 2" REALSIZE_ARGS="--width 16" MASK_ARGS="--sd2-width 16 --steps 2")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia_smi.txt"
summary="{"

part() {  # part NAME LIMIT_S COMMAND...: run it under its limit, its log to OUT/NAME.log, its last line to NAME.json
    local name=$1 limit=$2 start rc
    shift 2
    [[ " ${GPU_CHECK_PARTS:-realsize tests mask_mode gpu_throughput} " == *" $name "* ]] || return 0
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    summary+="\"$name\": {\"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}, "
    echo "$name: exit $rc after $(( $(date +%s) - start )) s" >&2
}

part realsize 200 "$PY" bench/realsize_memory.py --warmup 2 --steps 3 \
    --only bf16_b8 bf16_b8_consistency bf16_b8_consistency_default ${REALSIZE_ARGS:-}
part tests 150 env SKINDUAL_REQUIRE_GPU=1 "$PY" -m pytest -q -s -p no:cacheprovider tests/test_gpu.py
[ -f "$OUT/tests.log" ] && "$PY" - "$OUT" <<'PYEOF'
import json, re, sys
out = sys.argv[1]
log = open(f"{out}/tests.log").read()
found = re.findall(r"(\d+ (?:passed|failed|errors?)[^\n]*?) in [\d.]+s", log)
summary = found[-1] if found else (log.strip().splitlines() or [""])[-1]
figures = [line for line in log.splitlines() if line.startswith(("fp16:", "torch.float16:", "torch.bfloat16:"))]
print(json.dumps({"summary": summary, "figures": figures}), file=open(f"{out}/tests.json", "w"))
PYEOF
part mask_mode 90 "$PY" bench/mask_mode_throughput.py --batch-size 8 --batches 1 --repeats 3 \
    ${MASK_ARGS:---sd2-width 1 --dtype bf16}
part gpu_throughput 120 "$PY" bench/gpu_throughput.py --batches 1 8 16 ${BENCH_ARGS:-}
echo "${summary%, }}" | tee "$OUT/summary.json"
! grep -q '"rc": [1-9]' "$OUT/summary.json"
