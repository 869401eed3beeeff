#!/usr/bin/env bash
# Build the images docker-compose.yml needs from Debian's packages, for
# machines that can run Docker but cannot pull from an image registry.
#
#   deploy/local-images.sh [--env-file FILE] [--with-prometheus]
#   docker compose --env-file FILE up --exit-code-from job
#
# It builds only what is missing (the base image is cached as an image; the
# others are plain `docker build`s, which reuse their layer cache):
#   sagmq-local/base:bookworm        debootstrap --variant=minbase bookworm + python3, venv, CA certificates
#   sagmq-local/rabbitmq:3.10        Debian's rabbitmq-server, management + prometheus plugins (deploy/rabbitmq/Dockerfile.debian)
#   sagmq-local/sagmq:latest         deploy/Dockerfile itself, BASE_IMAGE = the base, WHEELHOUSE = wheels pip fetched on the host
#   sagmq-local/prometheus:bookworm  Debian's prometheus (deploy/prometheus/Dockerfile.debian), with --with-prometheus
# and writes FILE (default: $SAGMQ_IMAGE_CACHE/images.env) with SAGMQ_IMAGE,
# SAGMQ_RABBITMQ_IMAGE and SAGMQ_PROMETHEUS_IMAGE for Compose's --env-file.
#
# Needs: root (debootstrap), docker, debootstrap, python3 with pip that can
# reach the Python package index. Containers only need Debian's archive.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${SAGMQ_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sagmq-images}"
MIRROR="${SAGMQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE="${SAGMQ_BASE_IMAGE:-sagmq-local/base:bookworm}"
RABBIT="${SAGMQ_RABBITMQ_IMAGE:-sagmq-local/rabbitmq:3.10}"
SAGMQ="${SAGMQ_IMAGE:-sagmq-local/sagmq:latest}"
PROM="${SAGMQ_PROMETHEUS_IMAGE:-sagmq-local/prometheus:bookworm}"
DOCKER="${DOCKER:-docker}"
ENV_FILE=""
WITH_PROMETHEUS=0

while [ $# -gt 0 ]; do
    case "$1" in
        --env-file) ENV_FILE="$2"; shift 2 ;;
        --with-prometheus) WITH_PROMETHEUS=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
ENV_FILE="${ENV_FILE:-$CACHE/images.env}"
mkdir -p "$CACHE"

log() { printf '[local-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

build_base() {
    if have_image "$BASE"; then log "base $BASE: present"; return; fi
    local dir="$CACHE/rootfs"
    rm -rf "$dir"
    log "base $BASE: debootstrap bookworm ($MIRROR)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    # The archive's lists are stale the moment the image is made; images that
    # install packages run apt-get update themselves.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb
    tar -C "$dir" -c . | "$DOCKER" import \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$dir"
    log "base $BASE: imported"
}

# Wheels for sagmq's dependencies and build backend, for CPython 3.11 on
# x86-64 Linux (Debian bookworm's python3), fetched by the host's pip.
build_wheelhouse() {
    local wh="$1"
    mkdir -p "$wh"
    python3 - "$ROOT/pyproject.toml" >"$CACHE/requirements.txt" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    data = tomllib.load(f)
print("\n".join(data["project"]["dependencies"] + data["build-system"]["requires"]))
PY
    python3 -m pip download -q --dest "$wh" --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -r "$CACHE/requirements.txt"
}

# deploy/Dockerfile with a tar build context: the files it copies, plus the
# wheelhouse under wheelhouse/ (so nothing is written into the working tree).
image_id() { "$DOCKER" image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }

# A rebuilt tag leaves the previous image dangling; remove it unless a container still uses it.
drop_old() {
    local old="$1" new
    new="$(image_id "$2")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then "$DOCKER" rmi "$old" >/dev/null 2>&1 || true; fi
}

build_sagmq() {
    local wh="$CACHE/wheelhouse" old
    old="$(image_id "$SAGMQ")"
    build_wheelhouse "$wh"
    log "sagmq $SAGMQ: docker build -f deploy/Dockerfile (BASE_IMAGE=$BASE)"
    tar -c --exclude='__pycache__' --exclude='*.pyc' \
            -C "$ROOT" pyproject.toml README.md services schemas jobs deploy/Dockerfile \
            -C "$CACHE" wheelhouse \
        | "$DOCKER" build -q -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE" \
            --build-arg WHEELHOUSE=wheelhouse -t "$SAGMQ" - >/dev/null
    drop_old "$old" "$SAGMQ"
}

build_from() {  # build_from IMAGE DOCKERFILE: a Dockerfile from deploy/ on the base image
    local old
    old="$(image_id "$1")"
    log "$1: docker build -f $2"
    tar -c -C "$ROOT" "$2" deploy/rabbitmq/entrypoint.sh \
        | "$DOCKER" build -q -f "$2" --build-arg "BASE_IMAGE=$BASE" -t "$1" - >/dev/null
    drop_old "$old" "$1"
}

build_base
build_from "$RABBIT" deploy/rabbitmq/Dockerfile.debian
build_sagmq
if [ "$WITH_PROMETHEUS" = 1 ]; then build_from "$PROM" deploy/prometheus/Dockerfile.debian; fi

mkdir -p "$(dirname "$ENV_FILE")"
{
    echo "# written by deploy/local-images.sh; use with: docker compose --env-file $ENV_FILE ..."
    echo "SAGMQ_IMAGE=$SAGMQ"
    echo "SAGMQ_RABBITMQ_IMAGE=$RABBIT"
    echo "SAGMQ_PROMETHEUS_IMAGE=$PROM"
} >"$ENV_FILE"
log "images ready; env file: $ENV_FILE"
echo "$ENV_FILE"
