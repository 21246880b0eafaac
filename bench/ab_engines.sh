#!/usr/bin/env bash
# Same-card A/B of whole-process `intruder scan` wall, cold then warm, on one generated pair:
# the engine of this checkout against an earlier copy of the intruder/ package (OLD_ROOT, a
# folder holding intruder/), old first, then new. Prints each wall and the largest
# max|cos| difference between the two engines' cold reports.
#   bash bench/ab_engines.sh PAIR_DIR OLD_ROOT
set -u
P=$1; OLD=$2; NEW=$PWD
for label_root in "old:$OLD" "new:$NEW"; do
  label=${label_root%%:*}; root=${label_root#*:}
  rm -rf "$P/ab-cache"
  for run in cold warm; do
    /usr/bin/time -f "$label $run: %e s" env PYTHONPATH="$root" python3 "$NEW/bench/_child.py" \
      scan "$P/base" "$P/tuned" -q -o "$P/ab-$label-$run.json" --cache-dir "$P/ab-cache" \
      --device cuda --epsilon 0.5,0.7,0.9
  done
done
python3 - "$P" <<'PY'
import json, sys
p = sys.argv[1]
a, b = (json.load(open(f"{p}/ab-{x}-cold.json")) for x in ("old", "new"))
la = {l["name"]: l for l in a["layers"] if l.get("max_cos")}
err = max(abs(x - y) for l in b["layers"] if l.get("max_cos")
          for x, y in zip(l["max_cos"], la[l["name"]]["max_cos"]))
dec = sum(1 for l in b["layers"] if l.get("max_cos") and
          [len(l["intruders"])] != [len(la[l["name"]]["intruders"])])
print(f"old vs new cold: max |max_cos diff| {err:.2e}, matrices with other intruder counts {dec}")
print("scan phase seconds old / new:", a["summary"].get("seconds"), b["summary"].get("seconds"))
PY
