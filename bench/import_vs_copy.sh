#!/usr/bin/env bash
# Bulk import throughput: `umstore-data-plane bulk import` of a JSON Lines file
# (parse, validate, a data key per user wrapped in batches, personal data
# sealed on the bulk engine, derive, COPY in committed batches of 5,000) as the
# writer login (the production identity: row-level security applies, so rows go
# through temporary tables) and as a superuser (COPY straight into the tables),
# beside `seed` (the same users generated in process, no parsing) and the
# ceiling: psql `\copy` of the very same rows already encrypted and rendered.
# Each run loads into a freshly migrated database of a throwaway PostgreSQL 15.
#   bash bench/import_vs_copy.sh [users=1000000] [runs=1] [engine=cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${1:-1000000}
RUNS=${2:-1}
ENGINE=${3:-cpu}
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
psql "$URL dbname=postgres" -qc "CREATE ROLE bench_writer LOGIN" >/dev/null

fresh() { psql "$URL dbname=postgres" -qc "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
          "$BIN" migrate up --database-url "$URL dbname=$1" >/dev/null 2>&1
          psql "$URL dbname=$1" -qc "GRANT umstore_writer TO bench_writer" >/dev/null; }
now() { date +%s.%N; }

# The input file, and the same users as encrypted COPY files (the ceiling).
"$BIN" seed --users "$USERS" --seed 1 --write-import-file "$WORK/users.jsonl" --database-url "$URL dbname=postgres" >/dev/null 2>&1
fresh bench_files
"$BIN" --data-dir "$WORK/keys" seed --users "$USERS" --seed 1 --write-copy-files "$WORK/copy" \
    --database-url "$URL dbname=bench_files" >/dev/null 2>&1
echo "input: $(du -h "$WORK/users.jsonl" | cut -f1) of JSON Lines"

imp_w=(); imp_s=(); seed_t=(); copy_t=()
for i in $(seq "$RUNS"); do
    fresh bench_import_w
    t0=$(now); "$BIN" --data-dir "$WORK/keys" bulk import "$WORK/users.jsonl" --engine "$ENGINE" --no-refresh-stats \
        --rejects "$WORK/rejects-w" --database-url "host=127.0.0.1 port=$PORT user=bench_writer dbname=bench_import_w" \
        > "$WORK/import-w.out" 2>&1; t1=$(now)
    imp_w+=("$(echo "$t1 - $t0" | bc)")
    fresh bench_import_s
    t0=$(now); "$BIN" --data-dir "$WORK/keys" bulk import "$WORK/users.jsonl" --engine "$ENGINE" --no-refresh-stats \
        --rejects "$WORK/rejects-s" --database-url "$URL dbname=bench_import_s" > "$WORK/import-s.out" 2>&1; t1=$(now)
    imp_s+=("$(echo "$t1 - $t0" | bc)")
    fresh bench_seed
    t0=$(now); "$BIN" --data-dir "$WORK/keys" seed --users "$USERS" --seed 1 --database-url "$URL dbname=bench_seed" >/dev/null 2>&1; t1=$(now)
    seed_t+=("$(echo "$t1 - $t0" | bc)")
    fresh bench_copy
    t0=$(now); psql -q -v ON_ERROR_STOP=1 -f "$WORK/copy/load.psql" "$URL dbname=bench_copy" >/dev/null; t1=$(now)
    copy_t+=("$(echo "$t1 - $t0" | bc)")
done
grep -h "imported" "$WORK/import-w.out" "$WORK/import-s.out" || { cat "$WORK/import-w.out" "$WORK/import-s.out"; exit 1; }
for db in bench_import_w bench_import_s; do
    n=$(psql "$URL dbname=$db" -tAc "SELECT count(*) FROM umstore.user_metadata")
    [[ $n -eq $USERS ]] || { echo "$db holds $n users, not $USERS" >&2; exit 1; }
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mw=$(median "${imp_w[@]}"); mis=$(median "${imp_s[@]}"); ms=$(median "${seed_t[@]}"); mc=$(median "${copy_t[@]}")
echo "users: $USERS x $RUNS runs, engine $ENGINE"
echo "import as writer (s): ${imp_w[*]}"
echo "import as superuser (s): ${imp_s[*]}"
echo "seed (s):             ${seed_t[*]}"
echo "psql \\copy (s):       ${copy_t[*]}"
awk -v u="$USERS" -v w="$mw" -v s2="$mis" -v s="$ms" -v c="$mc" 'BEGIN {
  printf "import (writer):    median %.2f s = %.0f users/s, %.2fx the COPY ceiling\n", w, u/w, c/w;
  printf "import (superuser): median %.2f s = %.0f users/s, %.2fx the COPY ceiling\n", s2, u/s2, c/s2;
  printf "seed:               median %.2f s = %.0f users/s, %.2fx the COPY ceiling\n", s, u/s, c/s;
  printf "psql \\copy ceiling: median %.2f s = %.0f users/s\n", c, u/c }'
