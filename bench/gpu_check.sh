#!/usr/bin/env bash
# The GPU checks in one go (under 8 minutes on one GPU): the CUDA tests, which fail rather than skip without
# a usable GPU, then the generation throughput bench at SD-2-base's size (512², 25 steps, fp16 and bf16,
# batch 1-16).  Every result is a JSON line in OUT (default ./gpu-check):
#   tests.json            the CUDA tests' outcome and the figures they print (skipped steps, NaN counts)
#   gpu_throughput.json   the bench's last line
#   nvidia_smi.txt        the GPU, its driver and memory
#
#   bash bench/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia_smi.txt"
start=$(date +%s)
SKINDUAL_REQUIRE_GPU=1 timeout 360 "$PY" -m pytest -q -s -p no:cacheprovider tests/test_gpu.py > "$OUT/tests.log" 2>&1
tests_rc=$?
"$PY" - "$OUT" "$tests_rc" <<'PYEOF'
import json, re, sys
out, rc = sys.argv[1], int(sys.argv[2])
log = open(f"{out}/tests.log").read()
found = re.findall(r"(\d+ (?:passed|failed|errors?)[^\n]*?) in [\d.]+s", log)
summary = found[-1] if found else (log.strip().splitlines() or [""])[-1]
figures = [line for line in log.splitlines() if line.startswith(("fp16:", "torch.float16:", "torch.bfloat16:"))]
print(json.dumps({"tests_rc": rc, "summary": summary, "figures": figures}), file=open(f"{out}/tests.json", "w"))
PYEOF
# BENCH_ARGS: other bench settings (e.g. a narrow CPU check of this script: --width 16 --resolution 128 --steps 2)
timeout 300 "$PY" bench/gpu_throughput.py ${BENCH_ARGS:-} > "$OUT/gpu_throughput.log" 2>&1
bench_rc=$?
tail -n 1 "$OUT/gpu_throughput.log" > "$OUT/gpu_throughput.json"
echo "{\"tests_rc\": $tests_rc, \"bench_rc\": $bench_rc, \"seconds\": $(( $(date +%s) - start ))}" | tee "$OUT/summary.json"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
