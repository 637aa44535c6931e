#!/usr/bin/env bash
# Proof that the containers work as documented: build the image on a locally built base image,
# bring docker/docker-compose.yml up on its bridge network (the default, no host networking),
# check every role's own health, send one event through ingest → cluster-events → the
# notifications' fan-out into the cluster's feed, see 3 cluster-events replicas share the
# work, bring it all down.
#
#   docker/test-containers.sh            (from anywhere; needs podman or docker, and root or
#                                          rootless podman; debootstrap unless BASE_IMAGE is set)
# Exit codes: 0 proven, 1 failed (a role not running, restarting, unhealthy, an event not
# through, the image too big), 77 cannot run here (no working engine, compose, OCI runtime
# or debootstrap).
#
# Environment: ENGINE=podman|docker (default: the first that works), BASE_IMAGE (skip the
# debootstrap base), STREAMPROC_CACHE (where the base rootfs is kept; default ~/.cache/streamproc),
# REPLICAS (cluster-events replicas, default 3), MAX_IMAGE_MB (default 300), KEEP=1 (leave the
# stack up for a look; `down` it yourself), CRASH_ROLE=SERVICE (the proof of the proof: that
# service gets a command that exits at once, as a crash-looping role would; the run must end
# with exit 1 naming it).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
skip() { echo "SKIP: $*" >&2; exit 77; }
say() { echo "== $*" >&2; }
fail() { echo "FAIL: $*" >&2; exit 1; }

work=$(mktemp -d)
project="spctest$$"
started=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $started && -z ${KEEP:-} ]]; then
    say "down (project $project)"
    dc down -v >"$work/down.log" 2>&1 || tail -20 "$work/down.log" >&2
    if [[ $engine == podman ]]; then
      # What a failed `down` may leave: the project's containers, network and volumes.
      podman ps -aq --filter "label=io.podman.compose.project=$project" \
        | xargs -r podman rm -f -t 5 >/dev/null 2>&1 || true
      podman network rm -f "${project}_default" >/dev/null 2>&1 || true
      podman volume ls -q --filter "label=io.podman.compose.project=$project" \
        | xargs -r podman volume rm -f >/dev/null 2>&1 || true
    fi
  elif [[ -n $started ]]; then
    say "KEEP=1: the stack $project stays up"
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ engine and compose
engine=${ENGINE:-}
if [[ -z $engine ]]; then
  if command -v podman >/dev/null; then engine=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  else skip "neither podman nor a running docker engine"; fi
fi
if [[ $engine == podman ]]; then
  # What podman from Debian needs on these machines, without touching /etc: an OCI runtime
  # (runc, or crun), cgroupfs, lower default ulimits (the sandbox's hard limits are below
  # podman's defaults).
  if [[ -z ${CONTAINERS_CONF:-} ]]; then
    runtime=""
    for r in runc crun; do command -v "$r" >/dev/null && { runtime=$r; break; }; done
    [[ -n $runtime ]] || skip "cannot run here: no OCI runtime (runc or crun; apt-get install runc)"
    cat >"$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "$runtime"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
    export CONTAINERS_CONF="$work/containers.conf"
  fi
  podman info >/dev/null 2>&1 || skip "cannot run here: podman info fails ($(podman info 2>&1 | tail -1))"
  if command -v podman-compose >/dev/null; then
    # podman-compose 1.0.x adds "--net <project>_default" even to network_mode: host services
    # (docker-compose.hostnet.yml), which podman refuses; leave the network arguments out
    # where a network_mode is set. The bridge stack proven here does not depend on it.
    pc_python=$(head -1 "$(command -v podman-compose)" | sed 's/^#! *//; s/ .*//')
    compose=("$pc_python" -c 'import sys, podman_compose as pc
orig = pc.get_net_args
pc.get_net_args = lambda c, cnt: [] if cnt.get("network_mode") else orig(c, cnt)
sys.argv[0] = "podman-compose"
pc.main()')
  elif podman compose version >/dev/null 2>&1; then compose=(podman compose)
  else skip "podman-compose is not installed (apt-get install podman-compose)"; fi
  build_format=(--format docker --ignorefile "$root/docker/Dockerfile.dockerignore")
else
  docker compose version >/dev/null 2>&1 || skip "docker compose plugin missing"
  compose=(docker compose)
  build_format=()
fi
say "engine: $engine, compose: ${compose[0]##*/}"

files=(-f "$root/docker/docker-compose.yml")
dc() { "${compose[@]}" -p "$project" "${files[@]}" "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ base image
base=${BASE_IMAGE:-}
if [[ -z $base ]]; then
  base=localhost/streamproc-base:bookworm
  if ! $engine image inspect "$base" >/dev/null 2>&1; then
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
    # Smaller: no package archives, apt lists, docs, locales. The host's CA bundle: package
    # downloads during the build trust what the host trusts. /data owned by redis: the Redis
    # service runs as that user and its volume starts as a copy of this folder.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$rootfs/data" && chroot "$rootfs" chown redis:redis /data
    say "import $base"
    tar -C "$rootfs" -c . | $engine import - "$base" >/dev/null
  fi
fi
# The OCI runtime in earnest: a container that runs `true`.
if ! $engine run --rm --network none "$base" true >"$work/smoke.log" 2>&1; then
  if grep -qiE 'oci runtime|runtime .*not found|executable file not found in \$PATH.*(runc|crun)' "$work/smoke.log"; then
    skip "cannot run here: no working OCI runtime: $(tail -1 "$work/smoke.log")"
  fi
  tail -5 "$work/smoke.log" >&2
  skip "cannot run here: $engine cannot start a container"
fi

# ------------------------------------------------------------------ build
image=${STREAMPROC_IMAGE:-localhost/streamproc:ctest}
say "build $image on $base"
$engine build --network host "${build_format[@]}" -f "$root/docker/Dockerfile" \
  --build-arg BASE_IMAGE="$base" -t "$image" "$root" >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; exit 1; }
size_mb=$(( $($engine image inspect --format '{{.Size}}' "$image") / 1000000 ))
say "image $image: $size_mb MB"
(( size_mb < ${MAX_IMAGE_MB:-300} )) || fail "image is $size_mb MB, over ${MAX_IMAGE_MB:-300} MB"

ctrs() {  # the project's containers (name), all states
  if [[ $engine == podman ]]; then
    podman ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}'
  else
    docker ps -a --filter "label=com.docker.compose.project=$project" --format '{{.Names}}'
  fi
}
ctr_of() { ctrs | grep -E "[_-]$1[_-][0-9]+$" | head -1; }
state() { $engine inspect --format '{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}' "$1"; }
healthy() {  # the container's own HEALTHCHECK, run now (podman without systemd runs none itself)
  if [[ $engine == podman ]]; then
    podman healthcheck run "$1" >/dev/null 2>&1
  else
    [[ $(docker inspect --format '{{.State.Health.Status}}' "$1") == healthy ]]
  fi
}
logs_of() { $engine logs --tail 30 "$1" 2>&1 | sed "s/^/  $1| /" >&2; }

# ------------------------------------------------------------------ SIGTERM while waiting
say "a role waiting for a Redis that is not there stops on SIGTERM (as PID 1 of its container)"
waiter="${project}_waiter"
started=1
$engine run -d --name "$waiter" --label "io.podman.compose.project=$project" \
  --label "com.docker.compose.project=$project" --network none \
  -e REDIS_URL=redis://127.0.0.1:9/0 "$image" consume cluster-events >/dev/null 2>>"$work/podman.log"
for _ in $(seq 60); do
  $engine logs "$waiter" 2>&1 | grep -q waiting_for_redis && break
  sleep 1
done
$engine logs "$waiter" 2>&1 | grep -q waiting_for_redis || fail "the waiter never waited for Redis"
t0=$(date +%s)
$engine stop -t 25 "$waiter" >/dev/null 2>>"$work/podman.log"
t1=$(date +%s)
waited=$((t1 - t0))
read -r wstatus wcode < <($engine inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$waiter")
$engine logs "$waiter" 2>&1 | grep -q 'stopped by SIGTERM while waiting for Redis' \
  && [[ $wcode == 0 ]] \
  || { logs_of "$waiter"; fail "the waiting role did not stop on SIGTERM: $wstatus, exit $wcode after ${waited} s"; }
$engine rm -f "$waiter" >/dev/null 2>>"$work/podman.log"
say "stopped on SIGTERM: exit 0 after ${waited} s (podman stop's -t 25 would have killed it)"

# ------------------------------------------------------------------ up (bridge network)
replicas=${REPLICAS:-3}
export INGEST_PORT=$(free_port)
export STREAMPROC_IMAGE=$image REDIS_IMAGE=$base CLUSTER_EVENTS_REPLICAS=$replicas
export STREAMPROC_PREFIX="ctest$$" STREAMPROC_SECRETS="$work/secrets"
unset REDIS_PORT HTTP_PORT
# Redis users and passwords for this run (docker/redis_secrets.py), with the service name
# `redis` as the host: the roles reach it over the project's network.
python3 "$here/redis_secrets.py" --dir "$STREAMPROC_SECRETS" --prefix "$STREAMPROC_PREFIX" 2>/dev/null
services=(redis ingest cluster-events notifications tasks-crawl tasks renders housekeeping
  ticker-a ticker-b)
if [[ -n ${CRASH_ROLE:-} ]]; then
  # A prefix streamproc refuses: the role exits 2 at start, and restarts, and exits…
  printf 'services:\n  %s:\n    environment:\n      STREAMPROC_PREFIX: "no such prefix"\n' \
    "$CRASH_ROLE" >"$work/crash.yml"
  files+=(-f "$work/crash.yml")
fi
say "up on the bridge network ${project}_default: ${services[*]} (cluster-events x$replicas), ingest on host port $INGEST_PORT"
started=1
if [[ $engine == podman ]]; then
  # podman-compose 1.0.x has no --scale (the flag is accepted and ignored): the compose file's
  # deploy.replicas (CLUSTER_EVENTS_REPLICAS) makes the replicas.
  dc up -d "${services[@]}" >"$work/up.log" 2>&1 || { tail -40 "$work/up.log" >&2; fail "up"; }
else
  dc up -d --scale "cluster-events=$replicas" "${services[@]}" >"$work/up.log" 2>&1 \
    || { tail -40 "$work/up.log" >&2; fail "up"; }
fi

expected=$(( ${#services[@]} - 1 + replicas ))
mapfile -t all < <(ctrs)
(( ${#all[@]} == expected )) || fail "expected $expected containers, found ${#all[@]}: ${all[*]}"

# ------------------------------------------------------------------ every role running, healthy
say "every role running (no restart) and healthy by its own check"
declare -A ok=()
for _ in $(seq 60); do
  for c in "${all[@]}"; do
    read -r status restarts code < <(state "$c")
    if [[ $status != running || $restarts != 0 ]]; then
      logs_of "$c"
      fail "role $c is not running: $status, exit code $code, $restarts restart(s) (a crash loop)"
    fi
    [[ -n ${ok[$c]:-} ]] || ! healthy "$c" || ok[$c]=1
  done
  (( ${#ok[@]} == ${#all[@]} )) && break
  sleep 3
done
for c in "${all[@]}"; do
  if [[ -z ${ok[$c]:-} ]]; then
    [[ $engine == podman ]] && podman healthcheck run "$c" 2>&1 | tail -5 | sed "s/^/  /" >&2
    logs_of "$c"
    fail "role $c is not healthy"
  fi
done
{
  echo "ROLE HEALTH (each container's HEALTHCHECK, run now):"
  for c in "${all[@]}"; do
    printf '  %-40s healthy  %s\n' "$c" \
      "$($engine inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$c" \
        | sed -n 's/^STREAMPROC_CHECK_ARGS=//p; s/^STREAMPROC_CHECK_TICKER=1/ticker lease held/p' | tr '\n' ' ')"
  done
} | tee "$work/health.txt" >&2

# ------------------------------------------------------------------ the stack from outside
redis_ctr=$(ctr_of redis)
operator_url=$(sed -n 's/^REDIS_URL=//p' "$STREAMPROC_SECRETS/operator.env")
op() {  # the operator CLI in a container of the image, on the project's network
  $engine run --rm --network "${project}_default" --env-file "$STREAMPROC_SECRETS/operator.env" \
    -e STREAMPROC_PREFIX "$image" "$@"
}
rcli() {  # redis-cli in the Redis container, as the operator
  $engine exec "$redis_ctr" redis-cli --no-auth-warning -u "${operator_url/@redis:/@127.0.0.1:}" "$@"
}

say "Redis: not root, maxmemory with noeviction, no access without a user"
redis_uid=$($engine exec "$redis_ctr" sh -c 'id -u')
[[ $redis_uid != 0 ]] || fail "Redis runs as root"
memory=$(rcli INFO memory | tr -d '\r')
policy=$(sed -n 's/^maxmemory_policy://p' <<<"$memory")
maxmemory=$(sed -n 's/^maxmemory://p' <<<"$memory")
[[ $policy == noeviction && $maxmemory -gt 0 ]] || fail "Redis maxmemory=$maxmemory policy=$policy"
[[ $($engine exec "$redis_ctr" redis-cli PING 2>&1) == *NOAUTH* ]] \
  || fail "Redis answered without authentication"
consumer_url=$(sed -n 's/^REDIS_URL=//p' "$STREAMPROC_SECRETS/consumer.env")
[[ $($engine exec "$redis_ctr" redis-cli --no-auth-warning -u "${consumer_url/@redis:/@127.0.0.1:}" FLUSHALL 2>&1) == *NOPERM* ]] \
  || fail "the consumer user may FLUSHALL"

say "ingest from the host through its published port"
ingest="http://127.0.0.1:$INGEST_PORT"
python3 -c "import urllib.request as u; u.urlopen('$ingest/readyz', timeout=5)" \
  || fail "ingest's /readyz is not reachable on 127.0.0.1:$INGEST_PORT"
token=$(op agents add ctest-agent --types 'cluster.*' --clusters 'ctest-*' 2>"$work/agent.err" \
  | head -1) || true
[[ -n $token ]] || { cat "$work/agent.err" >&2; fail "agents add printed no token"; }

post() {  # post N spot interruptions (one request each) for cluster $1 from the host
  python3 - "$ingest" "$token" "$1" "$2" <<'PY'
import json, sys, urllib.request
url, token, cluster, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(n):
    body = json.dumps({"type": "cluster.spot_interruption", "cluster_id": cluster,
                       "instance_id": f"i-{cluster}-{i}", "instance_type": "m5.large",
                       "availability_zone": f"az{i % 3}"}).encode()
    req = urllib.request.Request(url + "/v1/events", data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202, r.status
PY
}

say "one event: ingest → cluster-events → notification in the feed of cluster ctest-one"
post ctest-one 1 || fail "ingest refused the event"
feed="$STREAMPROC_PREFIX:state:{feed}:ctest-one"
for _ in $(seq 60); do
  [[ $(rcli XLEN "$feed") -ge 1 ]] && break
  sleep 1
done
[[ $(rcli XLEN "$feed") -ge 1 ]] || { logs_of "$(ctr_of cluster-events)"; logs_of "$(ctr_of notifications)"; fail "no notification in $feed"; }
note=$(rcli XRANGE "$feed" - + | grep -o 'Spot interruption: [^"]*' | head -1 || true)
say "feed $feed: ${note:-an entry}"

say "$replicas cluster-events replicas share the work: 60 events, one request each"
post ctest-many 60 || fail "ingest refused the events"
acked_of() {  # events acked by one replica (its /metrics, read inside its container)
  $engine exec "$1" python -c '
import urllib.request as u
body = u.urlopen("http://127.0.0.1:9100/metrics", timeout=5).read().decode()
print(int(sum(float(l.split()[-1]) for l in body.splitlines()
              if l.startswith("streamproc_events_acked_total{") and "cluster-events" in l)))'
}
mapfile -t replicas_ctrs < <(ctrs | grep -E '[_-]cluster-events[_-][0-9]+$')
(( ${#replicas_ctrs[@]} == replicas )) || fail "${#replicas_ctrs[@]} cluster-events containers, expected $replicas"
total=0
for _ in $(seq 60); do
  total=0; split=()
  for c in "${replicas_ctrs[@]}"; do n=$(acked_of "$c"); total=$((total + n)); split+=("$c=$n"); done
  (( total >= 61 )) && break
  sleep 1
done
(( total >= 61 )) || fail "acked $total of 61 events (${split[*]})"
say "acked per replica: ${split[*]}"
busy=0
for s in "${split[@]}"; do (( ${s##*=} > 0 )) && busy=$((busy + 1)); done
(( busy == replicas )) || fail "only $busy of $replicas replicas acked events (${split[*]})"
op consumers --json >"$work/consumers.json" 2>/dev/null || true
names=$(python3 - "$work/consumers.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
names = sorted({g["name"] for p in doc.get("processes", []) for g in p.get("groups") or []
                if g.get("group") == "cluster-events" and g.get("online")})
print(" ".join(names))
PY
) || names=""
say "streamproc consumers (cluster-events): ${names:-?}"
[[ $(wc -w <<<"$names") -eq $replicas ]] || fail "streamproc consumers lists '${names}' for cluster-events, expected $replicas distinct"

say "inspect (the operator's view): no group breaches its limits"
op inspect --json --max-pending-age-s 60 >"$work/inspect.json" 2>"$work/inspect.err" \
  || { tail -c 3000 "$work/inspect.json" >&2; cat "$work/inspect.err" >&2; fail "inspect reports a breach"; }

say "a preview render in the renders container (its process pool), stored in its volume"
op publish render.requested '{"kind":"preview","width":16,"height":12,"frames":1}' \
  >/dev/null 2>"$work/publish.err" || { cat "$work/publish.err" >&2; fail "publish render.requested"; }
done_key="$STREAMPROC_PREFIX:{renders-done}:stream"
for _ in $(seq 90); do
  [[ $(rcli XLEN "$done_key") -ge 1 ]] && break
  sleep 1
done
location=$(rcli XRANGE "$done_key" - + | grep -o 'file:///data/artefacts/[^"]*' | head -1 || true)
[[ -n $location ]] || { logs_of "$(ctr_of renders)"; fail "no render.done with a file in /data/artefacts"; }
$engine exec "$(ctr_of renders)" test -s "${location#file://}" \
  || fail "$location is not in the renders container"

say "a stop is prompt: SIGTERM to a running role (podman stop) drains it, exit 0"
t0=$(date +%s)
$engine stop -t 20 "$(ctr_of renders)" >/dev/null 2>>"$work/podman.log"
read -r status _ code < <(state "$(ctr_of renders)")
t1=$(date +%s)
[[ $status == exited && $code == 0 ]] || fail "renders after stop: $status, exit code $code"
echo "PASS: $engine ran ${#all[@]} containers on a bridge network (redis as uid $redis_uid," \
  "maxmemory $maxmemory noeviction; image $size_mb MB); every role healthy by its own check;" \
  "ingest on 127.0.0.1:$INGEST_PORT took an event into $feed; $replicas cluster-events" \
  "replicas acked ${split[*]}; a render stored at $location; renders stopped on SIGTERM with exit 0 in $((t1 - t0)) s;" \
  "a role waiting for Redis stopped on SIGTERM in ${waited} s"
