#!/usr/bin/env bash
# Runs the data plane on this machine with its embedded PostgreSQL and 10,000
# demo users: http://127.0.0.1:8080/readyz. Ctrl-C stops it (and PostgreSQL).
# Extra arguments go to `serve` (e.g. --listen 127.0.0.1:9000). Once it listens,
# says where the API's bearer tokens are, one per purpose (docs/api.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

# Where serve listens and keeps the API tokens, as serve decides them: the
# flags, else their environment variables, else <data-dir>/api-tokens under
# the default data directory (embedded.rs: default_data_dir).
listen=${UMSTORE_LISTEN:-127.0.0.1:8080}
data_dir=${UMSTORE_DATA_DIR:-}
tokens_dir=${UMSTORE_API_TOKENS_DIR:-}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    next=${args[i + 1]:-}
    case ${args[i]} in
        --listen) listen=$next ;;
        --listen=*) listen=${args[i]#*=} ;;
        --data-dir) data_dir=$next ;;
        --data-dir=*) data_dir=${args[i]#*=} ;;
        --api-tokens-dir) tokens_dir=$next ;;
        --api-tokens-dir=*) tokens_dir=${args[i]#*=} ;;
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
tokens_dir=${tokens_dir:-$data_dir/api-tokens}
token_file=$tokens_dir/writer

# serve makes the token on first start, before it listens: once the port
# answers, say where the token is. Gives up when serve exits.
(
    host=${listen%:*}
    port=${listen##*:}
    host=${host#[}
    host=${host%]}
    while kill -0 $$ 2>/dev/null; do
        if [[ -s $token_file ]] && (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
            echo "run-local: API tokens, one per purpose, are in $tokens_dir; send an event with" >&2
            echo "  curl -H \"Authorization: Bearer \$(cat $token_file)\" -H 'Content-Type: application/json' --data @docs/events/examples/metadata_created.json http://$listen/api/v1/events" >&2
            echo "and read the user back with" >&2
            echo "  curl -H \"Authorization: Bearer \$(cat $tokens_dir/dashboard)\" http://$listen/api/v1/user-metadata/3f6c2a9e-8b41-4d7a-9c15-2e7b0d4a6f18" >&2
            exit 0
        fi
        sleep 1
    done
) &

exec cargo run --release --quiet -p umstore-data-plane -- serve --demo "$@"
