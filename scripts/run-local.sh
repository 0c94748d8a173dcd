#!/usr/bin/env bash
# Runs the data plane on this machine with its embedded PostgreSQL and 10,000
# demo users: http://127.0.0.1:8080/readyz. Ctrl-C stops it (and PostgreSQL).
# Extra arguments go to `serve` (e.g. --listen 127.0.0.1:9000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
exec cargo run --release --quiet -p umstore-data-plane -- serve --demo "$@"
