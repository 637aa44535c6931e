#!/usr/bin/env bash
# Ingest under wrk (Debian package wrk): single events (64 connections) and batches of 100
# (16 connections), one ingest process, an embedded Redis; rate limit off unless RATE is set
# (events/s per agent). Then, unless BASELINE=0, the single-event load on bare aiohttp
# (benchmarks/wrk/bare_server.py: no-op, and one XADD per request) for comparison.
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=$(.venv/bin/python -c "from streamproc.embedded import free_port; print(free_port())")
IPORT=$(.venv/bin/python -c "from streamproc.embedded import free_port; print(free_port())")
redis-server --port $PORT --save "" --appendonly no --daemonize yes --pidfile ${TMPDIR:-/tmp}/redis.pid >/dev/null
sleep 0.3
export REDIS_URL=redis://127.0.0.1:$PORT/0 STREAMPROC_LOG_LEVEL=warning STREAMPROC_INGEST_RATE_EVENTS_PER_S=${RATE:-0}
TOKEN=$(.venv/bin/streamproc agents add bench --types '*' --clusters '*' 2>/dev/null | grep -o 'spk_[A-Za-z0-9_-]*' | head -1)
.venv/bin/streamproc ingest --port $IPORT > ${TMPDIR:-/tmp}/ingest.log 2>&1 &
IPID=$!
sleep 4
cat > ${TMPDIR:-/tmp}/single.lua <<LUA
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.headers["Content-Type"] = "application/json"
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, '{"type":"cluster.spot_interruption","cluster_id":"c1","instance_id":"i-' .. counter .. '-' .. math.random(1e9) .. '","instance_type":"m5.large","availability_zone":"eu-west-1a"}')
end
LUA
python3 - "$TOKEN" > ${TMPDIR:-/tmp}/batch.lua <<'PY'
import sys, json
tok = sys.argv[1]
print('wrk.method = "POST"')
print(f'wrk.headers["Authorization"] = "Bearer {tok}"')
print('wrk.headers["Content-Type"] = "application/json"')
print('request = function()')
print('  local items = {}')
print('  for i = 1, 100 do items[i] = \'{"type":"cluster.spot_interruption","cluster_id":"c1","instance_id":"i-\' .. math.random(1e12) .. \'","instance_type":"m5.large","availability_zone":"eu-west-1a"}\' end')
print('  return wrk.format(nil, nil, nil, "[" .. table.concat(items, ",") .. "]")')
print('end')
PY
run() {  # name, connections, script, port
  echo "$1:"; wrk -t1 -c$2 -d10s --latency -s ${TMPDIR:-/tmp}/$3 http://127.0.0.1:$4/v1/events | grep -E "Requests/sec|50%|99%|Non-2xx|Socket"
}
run "ingest single" 64 single.lua $IPORT
run "ingest batch100" 16 batch.lua $IPORT
kill $IPID; wait $IPID || true
if [ "${BASELINE:-1}" = 1 ]; then  # the same load on bare aiohttp: what HTTP alone costs here
  for mode in noop xadd; do
    .venv/bin/python benchmarks/wrk/bare_server.py $IPORT $mode redis://127.0.0.1:$PORT/0 &
    BPID=$!; sleep 2
    run "bare aiohttp ($mode) single" 64 single.lua $IPORT
    kill $BPID; wait $BPID || true
  done
fi
kill $(cat ${TMPDIR:-/tmp}/redis.pid)
