#!/usr/bin/env bash
# Set up, build the bundled demo models if they are missing, and run the demo audit into reports/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export INTRUDER_DATA_DIR=${INTRUDER_DATA_DIR:-$(cd .. && pwd)/shared/data}
if ! python3 -c "import intruder.demo" 2>/dev/null; then
  echo "demo not built yet: intruder/demo.py lands with the bundled-demo issue" >&2
  exit 0
fi
exec python3 -m intruder.demo "$@"
