#!/usr/bin/env bash
# One GPU call (within one 10-minute device command): per-stage probe, 7B shapes on one and all
# GPUs (cold and warm twice), 70B subset (one layer, extrapolated). Everything lands in $OUT as it
# is produced (a call cut short still returns what ran).
#   bash bench/device_run.sh [7b|70b|all]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-all}
{ date -u; nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1; } > "$OUT/machine.txt" 2>&1
python - >> "$OUT/machine.txt" 2>&1 <<'PY'
import hashlib, os, threading, time
data = os.urandom(512 << 20)
for nt in (1, 8):
    def job():
        hashlib.sha256(data).hexdigest()
    ts = [threading.Thread(target=job) for _ in range(nt)]
    t0 = time.perf_counter(); [t.start() for t in ts]; [t.join() for t in ts]
    print(f"sha256 {nt} threads: {nt * len(data) / (time.perf_counter() - t0) / 1e9:.1f} GB/s")
PY
if [ "$what" != 70b ]; then
  timeout 90 python bench/probe_device.py --out "$OUT" --skip micro,scan > "$OUT/probe.txt" 2>&1
  timeout 330 python bench/scan_speed.py --model 7b --multi-gpu --repeat 2 \
    --results "$OUT/results.md" --log "$OUT/bench7b.log" > "$OUT/bench7b.txt" 2>&1
  echo "7b exit $?" >> "$OUT/bench7b.log"
fi
if [ "$what" != 7b ]; then
  timeout 150 python bench/scan_speed.py --model 70b --layers 1 --ref-layers 0 --peft-layers 0 \
    --results "$OUT/results.md" --log "$OUT/bench70b.log" > "$OUT/bench70b.txt" 2>&1
  echo "70b exit $?" >> "$OUT/bench70b.log"
fi
cat "$OUT/machine.txt"; tail -c 1800 "$OUT/probe.txt" 2>/dev/null
tail -c 2600 "$OUT/bench7b.txt" 2>/dev/null; tail -c 1500 "$OUT/bench70b.txt" 2>/dev/null
