#!/usr/bin/env bash
# Where a whole `intruder scan` spends its wall time, per thread: the intruder-heavy 7B pair
# (bench/synth_models.py --kind heavy, LAYERS layers), one cold scan under py-spy (every thread,
# idle included; then only the thread holding the GIL), summaries (bench/fold_profile.py) written to $OUT.
#   bash bench/profile_scan.sh [LAYERS [PYSPY]]    (default 16 layers, py-spy from PATH)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LAYERS=${1:-16}; SPY=${2:-py-spy}
W=${W:-/tmp/intruder-prof-heavy}
[ -f $W/bench_meta.json ] || python3 bench/synth_models.py --model 7b --out $W --layers "$LAYERS" \
  --kind heavy > /dev/null
args=(bench/_child.py scan $W/base $W/tuned -q --device cuda --epsilon 0.5,0.7,0.9)
rm -rf $W/c1; "$SPY" record --idle --threads --native -r 100 -f raw -o "$W/spy-all.txt" -- \
  python3 "${args[@]}" -o $W/s1.json --cache-dir $W/c1 2>&1 | tail -3
rm -rf $W/c1; "$SPY" record --gil --threads -r 100 -f raw -o "$W/spy-gil.txt" -- \
  python3 "${args[@]}" -o $W/s2.json --cache-dir $W/c1 2>&1 | tail -3
for f in all gil; do [ -f "$W/spy-$f.txt" ] && python3 bench/fold_profile.py "$W/spy-$f.txt" \
  --top 25 > "$OUT/spy-$f-summary.txt"; done
