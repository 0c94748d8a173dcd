#!/usr/bin/env bash
# Runs the data plane on this machine with its embedded PostgreSQL and 10,000
# demo users: http://127.0.0.1:8080/readyz. Ctrl-C stops it (and PostgreSQL).
# Extra arguments go to `serve` (e.g. --listen 127.0.0.1:9000). Once it listens,
# says where the bearer token of POST /api/v1/events is (docs/events.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

# Where serve listens and keeps the ingest token, as serve decides them: the
# flags, else their environment variables, else <data-dir>/ingest-token under
# the default data directory (embedded.rs: default_data_dir).
listen=${UMSTORE_LISTEN:-127.0.0.1:8080}
data_dir=${UMSTORE_DATA_DIR:-}
token_file=${UMSTORE_INGEST_TOKEN_FILE:-}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    next=${args[i + 1]:-}
    case ${args[i]} in
        --listen) listen=$next ;;
        --listen=*) listen=${args[i]#*=} ;;
        --data-dir) data_dir=$next ;;
        --data-dir=*) data_dir=${args[i]#*=} ;;
        --ingest-token-file) token_file=$next ;;
        --ingest-token-file=*) token_file=${args[i]#*=} ;;
    esac
done
if [[ -z $data_dir ]]; then
    if [[ $(id -u) -eq 0 ]]; then
        data_dir=/var/lib/umstore
    elif [[ -n ${XDG_DATA_HOME:-} ]]; then
        data_dir=$XDG_DATA_HOME/umstore
    elif [[ -n ${HOME:-} ]]; then
        data_dir=$HOME/.local/share/umstore
    else
        data_dir=.umstore
    fi
fi
token_file=${token_file:-$data_dir/ingest-token}

# serve makes the token on first start, before it listens: once the port
# answers, say where the token is. Gives up when serve exits.
(
    host=${listen%:*}
    port=${listen##*:}
    host=${host#[}
    host=${host%]}
    while kill -0 $$ 2>/dev/null; do
        if [[ -s $token_file ]] && (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
            echo "run-local: the ingest token is in $token_file; send an event with" >&2
            echo "  curl -H \"Authorization: Bearer \$(cat $token_file)\" -H 'Content-Type: application/json' --data @docs/events/examples/metadata_created.json http://$listen/api/v1/events" >&2
            exit 0
        fi
        sleep 1
    done
) &

exec cargo run --release --quiet -p umstore-data-plane -- serve --demo "$@"
