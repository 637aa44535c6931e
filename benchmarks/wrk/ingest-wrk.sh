#!/usr/bin/env bash
# Ingest under wrk (Debian package wrk): single events (64 connections) and batches of 100
# (16 connections), one ingest process, an embedded Redis; rate limit off.
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=$(.venv/bin/python -c "from streamproc.embedded import free_port; print(free_port())")
IPORT=$(.venv/bin/python -c "from streamproc.embedded import free_port; print(free_port())")
redis-server --port $PORT --save "" --appendonly no --daemonize yes --pidfile ${TMPDIR:-/tmp}/redis.pid >/dev/null
sleep 0.3
export REDIS_URL=redis://127.0.0.1:$PORT/0 STREAMPROC_LOG_LEVEL=warning STREAMPROC_INGEST_RATE_EVENTS_PER_S=0
TOKEN=$(.venv/bin/streamproc agents add bench --types '*' 2>/dev/null | grep -o 'spk_[A-Za-z0-9_-]*' | head -1)
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
echo "single:"; wrk -t1 -c64 -d10s --latency -s ${TMPDIR:-/tmp}/single.lua http://127.0.0.1:$IPORT/v1/events | grep -E "Requests/sec|50%|99%|Non-2xx|Socket"
echo "batch100:"; wrk -t1 -c16 -d10s --latency -s ${TMPDIR:-/tmp}/batch.lua http://127.0.0.1:$IPORT/v1/events | grep -E "Requests/sec|50%|99%|Non-2xx|Socket"
kill $IPID; sleep 2; kill $(cat ${TMPDIR:-/tmp}/redis.pid)
