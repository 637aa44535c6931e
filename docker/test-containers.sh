#!/usr/bin/env bash
# Proof that the containers run: build the image on a locally built base image, bring the
# compose file up with host networking, publish events, see them processed, bring it down.
#
#   docker/test-containers.sh            (from anywhere; needs podman or docker, and root or
#                                          rootless podman; debootstrap unless BASE_IMAGE is set)
# Exit codes: 0 proven, 1 failed, 77 cannot run here (no working engine/compose/debootstrap).
#
# Environment: ENGINE=podman|docker (default: the first that works), BASE_IMAGE (skip the
# debootstrap base), STREAMPROC_CACHE (where the base rootfs is kept; default ~/.cache/streamproc),
# KEEP=1 (leave the stack up for a look).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
skip() { echo "SKIP: $*" >&2; exit 77; }
say() { echo "== $*" >&2; }

# ------------------------------------------------------------------ engine and compose
engine=${ENGINE:-}
if [[ -z $engine ]]; then
  if command -v podman >/dev/null; then engine=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  else skip "neither podman nor a running docker engine"; fi
fi
command -v redis-cli >/dev/null || skip "redis-cli missing (Debian redis-tools)"
work=$(mktemp -d)
if [[ $engine == podman ]]; then
  # What podman from Debian needs on these machines, without touching /etc: runc, cgroupfs,
  # lower default ulimits (the sandbox's hard limits are below podman's defaults).
  if [[ -z ${CONTAINERS_CONF:-} ]]; then
    cat >"$work/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF="$work/containers.conf"
  fi
  podman run --rm --help >/dev/null 2>&1 || skip "podman does not work here"
  if command -v podman-compose >/dev/null; then
    # podman-compose 1.0.x adds "--net <project>_default" even to network_mode: host services,
    # which podman refuses; leave the network arguments out where a network_mode is set.
    pc_python=$(head -1 "$(command -v podman-compose)" | sed 's/^#! *//; s/ .*//')
    compose=("$pc_python" -c 'import sys, podman_compose as pc
orig = pc.get_net_args
pc.get_net_args = lambda c, cnt: [] if cnt.get("network_mode") else orig(c, cnt)
sys.argv[0] = "podman-compose"
pc.main()')
  elif podman compose version >/dev/null 2>&1; then compose=(podman compose)
  else skip "podman-compose is not installed (apt-get install podman-compose)"; fi
  build_format=(--format docker)  # keep the HEALTHCHECK (OCI images drop it)
else
  docker compose version >/dev/null 2>&1 || skip "docker compose plugin missing"
  compose=(docker compose)
  build_format=()
fi
say "engine: $engine, compose: ${compose[0]##*/} ${compose[1]}"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ base image
base=${BASE_IMAGE:-}
if [[ -z $base ]]; then
  base=localhost/streamproc-base:bookworm
  if ! $engine image exists "$base" 2>/dev/null && ! $engine image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || skip "debootstrap missing and BASE_IMAGE unset"
    cache=${STREAMPROC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamproc}
    rootfs="$cache/rootfs-bookworm"
    if [[ ! -x $rootfs/usr/bin/python3 ]]; then
      say "debootstrap a Debian bookworm base (python3, venv, redis-server) into $rootfs"
      mkdir -p "$cache"
      debootstrap --variant=minbase --include=python3,python3-venv,redis-server,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    fi
    # The host's CA bundle: package downloads during the build trust what the host trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    say "import $base"
    tar -C "$rootfs" -c . | $engine import - "$base" >/dev/null
  fi
fi

# ------------------------------------------------------------------ build
image=localhost/streamproc:ctest
say "build $image on $base"
$engine build --network host "${build_format[@]}" -f "$root/docker/Dockerfile" \
  --build-arg BASE_IMAGE="$base" -t "$image" "$root" >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; exit 1; }

# ------------------------------------------------------------------ up
project="spctest$$"
redis_port=$(free_port)
http_port=$(free_port)
export INGEST_PORT=$(free_port)
export STREAMPROC_IMAGE=$image REDIS_IMAGE=$base REDIS_PORT=$redis_port HTTP_PORT=$http_port
export STREAMPROC_PREFIX="ctest$$" STREAMPROC_SECRETS="$work/secrets"
# Redis users and passwords for this run (docker/redis_secrets.py); the commands run here
# (publish, check, inspect, redis-cli) log in as the operator.
python3 "$here/redis_secrets.py" --dir "$STREAMPROC_SECRETS" --host 127.0.0.1 \
  --port "$redis_port" --prefix "$STREAMPROC_PREFIX" 2>/dev/null
REDIS_URL=$(sed -n 's/^REDIS_URL=//p' "$STREAMPROC_SECRETS/operator.env")
export REDIS_URL
rcli() { redis-cli --no-auth-warning -u "$REDIS_URL" "$@"; }
files=(-f "$root/docker/docker-compose.yml" -f "$root/docker/docker-compose.hostnet.yml")
dc() { "${compose[@]}" -p "$project" "${files[@]}" "$@"; }
down() {
  if [[ -z ${KEEP:-} ]]; then
    say "down"
    dc down -v >"$work/down.log" 2>&1 || tail -20 "$work/down.log" >&2
    rm -rf "$work"
  fi
}
trap down EXIT
run() { $engine run --rm --network host -e REDIS_URL -e STREAMPROC_PREFIX "$image" "$@"; }

# Roles that exist in this image (ingest and ticker are built by others; run them when there).
services=(redis cluster-events tasks renders)
for role in ticker ingest; do
  if $engine run --rm "$image" "$role" --help >/dev/null 2>&1; then
    [[ $role == ticker ]] && services+=(ticker-a ticker-b)
    [[ $role == ingest ]] && services+=(ingest)
  fi
done
say "up: ${services[*]} (redis on $redis_port, metrics on $http_port)"
dc up -d "${services[@]}" >"$work/up.log" 2>&1 || { tail -40 "$work/up.log" >&2; exit 1; }

# ------------------------------------------------------------------ prove
say "wait for the consumer to be ready (its /readyz on the host's loopback)"
readyz() { python3 -c "import sys, urllib.request as u; u.urlopen('http://127.0.0.1:$http_port/readyz', timeout=2)" 2>/dev/null; }
for _ in $(seq 90); do readyz && break; sleep 1; done
readyz || { echo "FAIL: consumer not ready" >&2; dc logs 2>&1 | tail -60 >&2; exit 1; }
say "streamproc check in a container of the image"
run check cluster-events --http-port "$http_port" --timeout-s 5 >/dev/null

say "publish 3 events"
for n in 1 2 3; do
  run publish cluster.spot_interruption \
    "{\"cluster_id\":\"c$n\",\"instance_id\":\"i-$n\",\"instance_type\":\"m5.large\",\"availability_zone\":\"az$n\"}" \
    >/dev/null 2>&1
done

say "see them processed (metrics of the consumer container)"
acked=0
for _ in $(seq 60); do
  acked=$(python3 - "$http_port" <<'PY' || true
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=2).read().decode()
print(sum(float(l.split()[-1]) for l in body.splitlines() if l.startswith("streamproc_events_acked_total{")))
PY
)
  [[ ${acked%.*} -ge 3 ]] 2>/dev/null && break
  sleep 1
done
[[ ${acked%.*} -ge 3 ]] || { echo "FAIL: acked=$acked, expected 3" >&2; dc logs 2>&1 | tail -60 >&2; exit 1; }
run inspect --json --max-pending-age-s 60 >"$work/inspect.json" 2>/dev/null \
  || { cat "$work/inspect.json" >&2; echo "FAIL: inspect reports a breach" >&2; exit 1; }

say "a preview render in the renders container (its process pool, CPU), stored in its volume"
run publish render.requested '{"kind":"preview","width":16,"height":12,"frames":1}' >/dev/null 2>&1
done_key="$STREAMPROC_PREFIX:{renders-done}:stream"
for _ in $(seq 90); do
  [[ $(rcli XLEN "$done_key" 2>/dev/null) -ge 1 ]] && break
  sleep 1
done
location=$(rcli XRANGE "$done_key" - + | grep -o 'file:///data/artefacts/[^"]*' | head -1)
[[ -n $location ]] || { echo "FAIL: no render.done with a file in /data/artefacts" >&2; dc logs renders 2>&1 | tail -40 >&2; exit 1; }
ctr=$($engine ps --format '{{.Names}}' | grep "$project" | grep renders | head -1)
$engine exec "$ctr" test -s "${location#file://}" \
  || { echo "FAIL: $location is not in the renders container" >&2; exit 1; }

if [[ $engine == podman ]]; then
  say "the image's HEALTHCHECK passes in the consumer container"
  ctr=$(podman ps --filter "label=io.podman.compose.project=$project" --format '{{.Names}}' | grep cluster-events | head -1)
  podman healthcheck run "$ctr" >/dev/null
fi
say "Redis refuses a client without a password, and the consumer's user FLUSHALL"
[[ $(redis-cli -p "$redis_port" PING 2>&1) == *NOAUTH* ]] \
  || { echo "FAIL: Redis answered without authentication" >&2; exit 1; }
consumer_url=$(sed -n 's/^REDIS_URL=//p' "$STREAMPROC_SECRETS/consumer.env")
[[ $(redis-cli --no-auth-warning -u "$consumer_url" FLUSHALL 2>&1) == *NOPERM* ]] \
  || { echo "FAIL: the consumer user may FLUSHALL" >&2; exit 1; }
echo "PASS: $engine ran redis + ${services[*]:1}; 3 events published, $acked acked; a render stored at $location"
