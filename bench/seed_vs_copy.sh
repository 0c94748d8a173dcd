#!/usr/bin/env bash
# Seed throughput: `umstore-data-plane seed` (generate, encrypt, COPY) against
# the baseline of psql `\copy` loading the very same rows from files (no
# generation, no encryption), into a freshly migrated database each run.
#   bash bench/seed_vs_copy.sh [users=200000] [runs=3]
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-200000}
RUNS=${2:-3}
cargo build --release --quiet -p umstore-data-plane
BIN=$PWD/target/release/umstore-data-plane
BINDIR=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d /tmp/umstore-bench-XXXXXX)
chmod 755 "$WORK"
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
mkdir "$WORK/pg" && { [[ $(id -u) -ne 0 ]] || chown postgres "$WORK" "$WORK/pg"; }
cleanup() { as_pg "$BINDIR/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
as_pg "$BINDIR/initdb" -D "$WORK/pg" -U umstore --auth=trust -E UTF8 --locale=C >/dev/null
as_pg "$BINDIR/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/log" -w -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c shared_buffers=1GB -c max_wal_size=8GB -c checkpoint_timeout=30min" start >/dev/null
URL="host=127.0.0.1 port=$PORT user=umstore"

fresh() { psql "$URL dbname=postgres" -qc "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
          "$BIN" migrate up --database-url "$URL dbname=$1" >/dev/null 2>&1; }
now() { date +%s.%N; }

# The same rows as files (the keyring, hence the blind-index key, lives in a database).
fresh bench_files
"$BIN" --data-dir "$WORK/keys" seed --users "$USERS" --seed 1 --write-copy-files "$WORK/copy" \
    --database-url "$URL dbname=bench_files" >/dev/null 2>&1


seed_t=(); copy_t=()
for i in $(seq "$RUNS"); do
    fresh bench_seed
    t0=$(now); "$BIN" --data-dir "$WORK/keys" seed --users "$USERS" --seed 1 --database-url "$URL dbname=bench_seed" >/dev/null 2>&1; t1=$(now)
    seed_t+=("$(echo "$t1 - $t0" | bc)")
    fresh bench_copy
    t0=$(now); psql -q -v ON_ERROR_STOP=1 -f "$WORK/copy/load.psql" "$URL dbname=bench_copy" >/dev/null; t1=$(now)
    copy_t+=("$(echo "$t1 - $t0" | bc)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms=$(median "${seed_t[@]}"); mc=$(median "${copy_t[@]}")
rows=$(psql "$URL dbname=bench_seed" -tAc "SELECT count(*) FROM umstore.user_metadata")
echo "users: $USERS x $RUNS runs (rows in user_metadata after the last seed: $rows)"
echo "seed runs (s):        ${seed_t[*]}"
echo "psql \\copy runs (s):  ${copy_t[*]}"
awk -v u="$USERS" -v s="$ms" -v c="$mc" 'BEGIN {
  printf "seed:       median %.2f s = %.0f users/s\n", s, u/s;
  printf "psql \\copy: median %.2f s = %.0f users/s\n", c, u/c;
  printf "ratio seed/baseline throughput: %.2f\n", c/s }'
