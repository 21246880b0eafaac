#!/usr/bin/env bash
# One call on the GPU machine: the 7B benchmark (+ all GPUs), the 70B subset, then the probe.
# Everything lands in $OUT as it is produced (a call cut short still returns what ran).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{ nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1; } > "$OUT/machine.txt" 2>&1
timeout 300 python bench/scan_speed.py --model 7b --multi-gpu --results "$OUT/results.md" \
  --log "$OUT/bench7b.log" > "$OUT/bench7b.txt" 2>&1
echo "7b exit $?" >> "$OUT/bench7b.log"
timeout 110 python bench/scan_speed.py --model 70b --layers 1 --ref-layers 0 --peft-layers 0 \
  --results "$OUT/results.md" --log "$OUT/bench70b.log" > "$OUT/bench70b.txt" 2>&1
echo "70b exit $?" >> "$OUT/bench70b.log"
timeout 70 python bench/probe_device.py --out "$OUT" --skip scan > "$OUT/probe.txt" 2>&1
tail -c 2500 "$OUT/bench7b.txt"; tail -c 1500 "$OUT/bench70b.txt"; tail -c 2000 "$OUT/probe.txt"
