#!/usr/bin/env bash
# One GPU call (within one 10-minute device command), everything the engine's speed claims rest
# on, most important first: per-stage times of one matrix (stage_probe.py), the intruder-heavy
# 7B pair (cold, warm, the paper's algorithm, the float64 exact engine), the fleet compare
# (1 and n fine-tunes; torchrun where several GPUs are visible), the 135M pairs, the start-up
# floor, the mild 7B pair. Each stage gets what is left of a global deadline, so a call cut
# short still returns what ran. What comes back: $OUT/results.md (the RESULTS.md sections) and
# $OUT/all.txt (every stage's output), nothing else (the device returns at most 8 files).
#   bash bench/device_run.sh [SECONDS [STAGES]]   (default 540 s; STAGES: a comma-separated subset,
#                                                 in this order, default all)
# The abold and profile stages need git-ignored files carried to the device (run's `carry`:
# .devcarry), made here first:
#   mkdir -p .devcarry/old && git archive REV intruder | tar -x -C .devcarry/old   # engine A/B
#   pip download py-spy --no-deps -d /tmp/w && unzip -o -q /tmp/w/py_spy-*.whl -d /tmp/w && \
#     cp /tmp/w/py_spy-*.data/scripts/py-spy .devcarry/                              # profile
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L=$(mktemp -d); R="$OUT/results.md"
end=$((SECONDS + ${1:-540}))
left() { local l=$((end - SECONDS)); [ "$l" -gt "$1" ] && echo "$1" || echo "$l"; }
ONLY=${2:-}
stage() {  # stage NAME MAX_SECONDS CMD...
  local name=$1 max=$2; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  local t; t=$(left "$max")
  if [ "$t" -lt 20 ]; then echo "$name: skipped (deadline)" >> "$L/stages.txt"; return; fi
  local t0=$SECONDS
  timeout "$t" "$@" > "$L/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s (limit $t s)" >> "$L/stages.txt"
}
{ date -u; nvidia-smi -L; nproc; lscpu | grep "Model name"; free -g | head -2; df -h /tmp | tail -1
  python3 -c 'import torch, scipy; print("torch", torch.__version__, "scipy", scipy.__version__)'
  git log --oneline -1; } > "$L/machine.txt" 2>&1
stage perstage 70 python3 bench/stage_probe.py --device cuda --model 7b --profile
stage heavy7b 230 python3 bench/scan_speed.py --model 7b --kinds heavy --peft-layers 0 \
  --results "$R" --log "$L/heavy7b.log" --keep
# the same pair with the engine in .devcarry/old (a copy of an earlier intruder/ package, when
# carried): a same-card A/B; then where the scan's threads spend their time (py-spy, carried)
HP=/tmp/intruder-bench-7b-heavy
[ -d .devcarry/old/intruder ] && [ -f $HP/bench_meta.json ] && stage abold 120 \
  bash bench/ab_engines.sh $HP $PWD/.devcarry/old
[ -x .devcarry/py-spy ] && [ -f $HP/bench_meta.json ] && stage profile 110 env W=$HP \
  bash bench/profile_scan.sh 32 $PWD/.devcarry/py-spy
rm -rf $HP
stage fleet7b 160 python3 bench/fleet_speed.py --model 7b --layers 16 --n 4 --results "$R" \
  --log "$L/fleet7b.log"
stage small135m 70 python3 bench/scan_speed.py --model 135m --peft-layers 0 --results "$R" \
  --log "$L/small135m.log"
stage startup 45 bash -c 'python3 bench/startup_probe.py --device cuda; python3 -X importtime \
  -c "import torch" 2>&1 | sort -t"|" -k2 -n | tail -8'
stage mild7b 120 python3 bench/scan_speed.py --model 7b --kinds mild --layers 16 --peft-layers 0 \
  --results "$R" --log "$L/mild7b.log"
for f in machine stages perstage heavy7b abold profile fleet7b small135m startup mild7b; do
  echo "=== $f"; cat "$L/$f.txt" 2>/dev/null; done > "$OUT/all.txt"
cat "$L/machine.txt" "$L/stages.txt"; grep -E "ms \[|profiler:" "$L/perstage.txt"
tail -12 "$L/startup.txt" 2>/dev/null
for f in heavy7b fleet7b small135m mild7b; do tail -c 1300 "$L/$f.log" 2>/dev/null; done
