#!/usr/bin/env bash
# Set up, then audit the bundled demo models (fixtures/demo/, built first when missing) into reports/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export INTRUDER_DATA_DIR=${INTRUDER_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec python3 -m intruder.demo "$@"
