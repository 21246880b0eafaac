#!/usr/bin/env bash
# GPU benchmark calls (each within one 10-minute device command). Everything lands in $OUT as it
# is produced (a call cut short still returns what ran).
#   bash bench/device_run.sh 7b    # per-stage probe, 7B shapes on 1 and all GPUs, RSS checks
#   bash bench/device_run.sh 70b   # 70B subset (one layer), extrapolated
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-7b}
{ date -u; nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1; } > "$OUT/machine.txt" 2>&1
rss() {  # peak RSS (GiB) of one intruder scan: rss TAG ENV... -- ARGS...
  local tag=$1; shift; local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local t0=$(date +%s.%N)
  env "${envs[@]}" INTRUDER_BENCH_RSS="$OUT/rss-$tag" python bench/_child.py scan "$@" -q \
    -o "/tmp/rss-$tag.json" >/dev/null 2>"$OUT/rss-$tag.err"
  echo "$tag: exit $? wall $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s peak RSS $(awk '{printf "%.2f", $1/2^30}' "$OUT/rss-$tag" 2>/dev/null) GiB" | tee -a "$OUT/rss.txt"
}
if [ "$what" = 7b ]; then
  timeout 100 python bench/probe_device.py --out "$OUT" --skip micro,scan > "$OUT/probe.txt" 2>&1
  timeout 330 python bench/scan_speed.py --model 7b --multi-gpu --keep --workdir /tmp/b7 \
    --results "$OUT/results.md" --log "$OUT/bench7b.log" > "$OUT/bench7b.txt" 2>&1
  echo "7b exit $?" >> "$OUT/bench7b.log"
  rss demo-cuda CUDA_VISIBLE_DEVICES=0 -- fixtures/demo/models/base fixtures/demo/models/lora_r8 --no-cache
  for b in 256 512; do
    rss "b7-budget$b" CUDA_VISIBLE_DEVICES=0 INTRUDER_HOST_BUDGET_MB=$b -- /tmp/b7/base /tmp/b7/tuned --no-cache
  done
  tail -c 1500 "$OUT/probe.txt"; tail -c 2500 "$OUT/bench7b.txt"; cat "$OUT/rss.txt"
else
  timeout 300 python bench/scan_speed.py --model 70b --layers 1 --ref-layers 0 --peft-layers 0 \
    --results "$OUT/results.md" --log "$OUT/bench70b.log" > "$OUT/bench70b.txt" 2>&1
  echo "70b exit $?" >> "$OUT/bench70b.log"
  tail -c 2500 "$OUT/bench70b.txt"
fi
