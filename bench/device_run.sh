#!/usr/bin/env bash
# One GPU call (within one 10-minute device command), everything the engine's speed claims rest
# on: the intruder-heavy and mild 7B pairs (cold, warm, the paper's algorithm, the float64 exact
# engine), the fleet compare (1 and n fine-tunes, 1 and 2 GPUs), the 135M pairs, the start-up
# probe. Each stage writes into $OUT as it runs and gets what is left of a global deadline, so a
# call cut short still returns what ran.
#   bash bench/device_run.sh [SECONDS]     (default 520)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
end=$((SECONDS + ${1:-520}))
left() { local l=$((end - SECONDS)); [ "$l" -gt "$1" ] && echo "$1" || echo "$l"; }
stage() {  # stage NAME MAX_SECONDS CMD...
  local name=$1 max=$2; shift 2
  local t; t=$(left "$max")
  if [ "$t" -lt 20 ]; then echo "$name: skipped (deadline)" >> "$OUT/stages.txt"; return; fi
  local t0=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s (limit $t s)" >> "$OUT/stages.txt"
}
{ date -u; nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1; git log --oneline -1; } \
  > "$OUT/machine.txt" 2>&1
R="$OUT/results.md"
stage heavy7b 230 python bench/scan_speed.py --model 7b --kinds heavy --peft-layers 0 \
  --results "$R" --log "$OUT/heavy7b.log"
stage fleet7b 200 python bench/fleet_speed.py --model 7b --layers 16 --n 4 --results "$R" \
  --log "$OUT/fleet7b.log"
stage startup 40 python bench/startup_probe.py --device cuda
stage small135m 70 python bench/scan_speed.py --model 135m --peft-layers 0 --results "$R" \
  --log "$OUT/small135m.log"
stage mild7b 120 python bench/scan_speed.py --model 7b --kinds mild --layers 16 --peft-layers 0 \
  --results "$R" --log "$OUT/mild7b.log"
cat "$OUT/machine.txt" "$OUT/stages.txt"; tail -c 1500 "$OUT/startup.txt"
for f in heavy7b fleet7b small135m mild7b; do tail -c 1400 "$OUT/$f.log" 2>/dev/null; done
