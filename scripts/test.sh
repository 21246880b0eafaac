#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # the HTML report is checked in a real headless browser
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed; the browser test will skip" >&2
fi
export INTRUDER_DATA_DIR=${INTRUDER_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec python3 -m pytest -q "$@"
