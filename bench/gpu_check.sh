#!/usr/bin/env bash
# The GPU checks in one go, in at most GPU_CHECK_BUDGET seconds (default 540: one 10-minute device call with room
# to spare), each part under its own time limit, most wanted first:
#   e2e             the whole chain on a local Ray cluster with the GPU, demo base first, then SD-2-base's size at
#                   512² bf16: stage_base, finetune --use-gpu with a killed and resumed worker, qc_model --use-gpu,
#                   generate into two shards on a GPU actor, evaluate with GPU actors (bench/gpu_e2e.py); at most 300 s
#   gpu_throughput  sampling at SD-2-base's size: eager batches 8-64 against image-only SD-2, where a batch's time
#                   goes (the masks' clean-up on the GPU vs the CPU), generate --compile's levers, compile time and
#                   time to the first shard (bench/gpu_throughput.py); what is left but 90 s, a budget it keeps to
#   tests           the CUDA tests, which fail rather than skip without a usable GPU (tests/test_gpu.py); what is left
#   realsize        (not by default: measured, README "Real size") the fine-tune's memory and step time at 512²
#                   (the joint model's defaults, with the reward, and a ControlNet's: --train controlnet, batch 8)
#   mask_mode       (not by default: measured) mask-conditioned against joint sampling at SD-2-base's size
# Every part writes its whole output to OUT/NAME.log and its last line (one JSON object) to OUT/NAME.json; the
# last line of this script (also OUT/summary.json) is one JSON object: per part its exit status, seconds and
# figures, and what ran them (each GPU's name, driver and memory; the torch that ran and constraints.txt's pin).
#
#   bash bench/gpu_check.sh [OUT]
# GPU_CHECK_PARTS: the parts, in order (default "e2e gpu_throughput tests"); PYTHON: the interpreter (default
# .venv/bin/python); E2E_ARGS, BENCH_ARGS, REALSIZE_ARGS, MASK_ARGS: other settings of those scripts.  A CPU check of
# this script (the e2e part then runs its reduced CPU mode):
#   BENCH_ARGS="--width 16 --resolution 128 --steps 2 --batches 1 2 --lever-batch 2 --arms fuse_qkv" \
#   GPU_CHECK_PARTS="e2e gpu_throughput" GPU_CHECK_BUDGET=3000 bash bench/gpu_check.sh /tmp/check
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
PARTS="${GPU_CHECK_PARTS:-e2e gpu_throughput tests}"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-540} ))
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$OUT/nvidia_smi.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpus.csv" 2>/dev/null || true
: > "$OUT/parts.txt"

limit() {  # limit CAP: the seconds a part may take, at most CAP, leaving 90 for the tests when they come after it
    local name=$1 cap=$2 left
    left=$(( DEADLINE - $(date +%s) ))
    [[ " $PARTS " == *" tests "* && $name != tests ]] && left=$(( left - 90 ))
    (( left > cap )) && left=$cap
    echo "$left"
}

part() {  # part NAME LIMIT COMMAND...: the command under LIMIT seconds; its log, its last line, its status
    local name=$1 limit=$2 start rc
    shift 2
    if (( limit < 20 )); then
        echo "$name skipped 0 $limit" >> "$OUT/parts.txt"
        echo "$name: skipped, ${limit} s left" >&2
        return 0
    fi
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 1 "$OUT/$name.log" > "$OUT/$name.json"
    echo "$name $rc $(( $(date +%s) - start )) $limit" >> "$OUT/parts.txt"
    echo "$name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" >&2
}

for name in $PARTS; do
    case $name in
        e2e) t=$(limit e2e 300)
             part e2e "$t" "$PY" bench/gpu_e2e.py --out "$OUT/e2e-work" --budget-s $(( t - 25 )) ${E2E_ARGS:-} ;;
        gpu_throughput) t=$(limit gpu_throughput 600)
             part gpu_throughput "$t" "$PY" bench/gpu_throughput.py --budget-s $(( t - 15 )) ${BENCH_ARGS:-} ;;
        tests) part tests "$(limit tests 600)" env SKINDUAL_REQUIRE_GPU=1 "$PY" -m pytest -q -s -p no:cacheprovider \
                   tests/test_gpu.py ;;
        realsize) part realsize "$(limit realsize 200)" "$PY" bench/realsize_memory.py --warmup 2 --steps 3 \
                      --only bf16_b8 bf16_b8_consistency bf16_b8_consistency_default controlnet_bf16_b8 \
                      ${REALSIZE_ARGS:-} ;;
        mask_mode) part mask_mode "$(limit mask_mode 90)" "$PY" bench/mask_mode_throughput.py --batch-size 8 \
                       --batches 1 --repeats 3 ${MASK_ARGS:---sd2-width 1 --dtype bf16} ;;
        *) echo "unknown part $name (e2e gpu_throughput tests realsize mask_mode)" >&2 ;;
    esac
done

"$PY" - "$OUT" <<'PYEOF'
import json, re, sys
out = sys.argv[1]
summary = {}
for line in open(f"{out}/parts.txt"):
    name, rc, seconds, limit = line.split()
    entry = {"rc": None if rc == "skipped" else int(rc), "seconds": int(seconds), "limit_s": int(limit)}
    if rc != "skipped":
        if name == "tests":
            log = open(f"{out}/tests.log", errors="replace").read()
            found = re.findall(r"(\d+ (?:passed|failed|errors?)[^\n]*?) in [\d.]+s", log)
            entry["summary"] = found[-1] if found else (log.strip().splitlines() or [""])[-1][-300:]
            entry["figures"] = [l for l in log.splitlines() if l.startswith(("fp16:", "torch.float16:", "torch.bfloat16:"))]
        else:
            last = open(f"{out}/{name}.json", errors="replace").read().strip()
            try:
                entry["figures"] = json.loads(last)
            except ValueError:
                entry["last_line"] = last[-300:]
    summary[name] = entry
summary["ok"] = bool(summary) and all(e["rc"] == 0 for e in summary.values() if isinstance(e, dict))
# what the figures were measured with: each GPU's name, driver and memory, and the torch that ran (a lent machine's
# image brings its own, which may not be constraints.txt's pin: both are named)
summary["gpus"] = [dict(zip(("name", "driver", "memory"), (f.strip() for f in line.split(","))))
                   for line in open(f"{out}/gpus.csv", errors="replace") if line.strip()]
try:
    import torch
    summary["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda}
except ImportError:
    summary["torch"] = None
pins = [l.split("==")[1].strip() for l in open("constraints.txt") if l.startswith("torch==")]
summary["torch_pinned"] = pins[0] if pins else None
print(json.dumps(summary), file=open(f"{out}/summary.json", "w"))
print(json.dumps(summary))
PYEOF
grep -q '"ok": true' "$OUT/summary.json"
