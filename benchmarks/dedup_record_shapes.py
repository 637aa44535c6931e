"""Dedup records: what each way of storing them costs Redis per record (issue 20).

    .venv/bin/python benchmarks/dedup_record_shapes.py [--records 200000] [--rounds 3]
        [--batch 500] [--json out.json]

Why. The publish script keeps a record per event id (an 8-byte digest -> the first entry's
id) so that a copy published twice, or a replay, adds nothing. With the issue's two targets,
≤ 60 bytes of dedup state per event and ≤ 1.3x the Redis CPU of dedup off, the record store
decides both. This measures the candidate shapes against each other, each in the same Lua
loop (one script call per ``--batch`` digests, random digests, all new), on one redis-server:

- ``hsetnx``: today's. Listpack shard hashes of ~24 records; one HSETNX per record looks it up
  and claims it.
- ``hsetnx-48``: the same with ~48 records a hash (the sizing before 2026-12-02).
- ``range``: a string table of 128-byte buckets (8 slots of digest + id); per record one
  GETRANGE of its bucket and, when absent, one SETRANGE of a free slot.
- ``bitfield``: the same table read and written with BITFIELD: per call one BITFIELD_RO that
  reads the 8 slots' first 32 bits of every record's bucket, one BITFIELD that writes each new
  record as 4 fields (u32, u32, u44 ms, u20 sequence: Lua numbers are doubles); 6,000
  arguments a command at most (``unpack``'s limit is ~8,000).
- ``hashtable``: 16 large hashes (Redis' hashtable encoding); per call one HMGET and one HSET
  per shard for all of the call's records in it: commands per call, not per record.

These are cost models, not dedup implementations: a full bucket drops the record, nothing
expires, no probing. Figures per record: Redis CPU µs (INFO cpu, user + sys, over the loop)
and the growth of ``used_memory`` over the records. Each round runs every shape once on a
fresh database, in a rotating order; the ratio to ``hsetnx`` is the median of its per-round
ratios (this shared VM's noise moves single figures by ±10 %).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
SHARDS_HT = 16
BUCKET = 128  # bytes: 8 slots of 16

# ARGV[1] the table size (shards or buckets), ARGV[2] a base ms for the ids, then the digests.
_PRELUDE = """
local size, base = tonumber(ARGV[1]), ARGV[2]
local function slot(d)
  local b1, b2, b3, b4 = string.byte(d, 1, 4)
  return ((b1 * 256 + b2) * 256 + b3) * 256 + b4
end
"""

_HSETNX = (
    _PRELUDE
    + """
local n = 0
for i = 3, #ARGV do
  local d = ARGV[i]
  local h = 'rec:' .. string.format('%d', slot(d) % size)
  n = n + redis.call('HSETNX', h, d, string.format('%s-%d', base, i))
end
return n
"""
)

SCRIPTS = {
    "hsetnx": _HSETNX,
    "hsetnx-48": _HSETNX,
    "range": _PRELUDE
    + """
local n, empty = 0, string.rep('\\0', 8)
for i = 3, #ARGV do
  local d = ARGV[i]
  local at = (slot(d) % size) * 128
  local bucket = redis.call('GETRANGE', 'table', string.format('%d', at),
    string.format('%d', at + 127))
  if not string.find(bucket, d, 1, true) then
    local e = 1
    while e < 128 and string.sub(bucket, e, e + 7) ~= empty do e = e + 16 end
    if e < 128 then
      local id = string.format('%s-%d', base, i)
      redis.call('SETRANGE', 'table', string.format('%d', at + e - 1),
        d .. string.sub(id .. string.rep('\\0', 8), 1, 8))
      n = n + 1
    end
  end
end
return n
""",
    "bitfield": _PRELUDE
    + """
local reads = {}
for i = 3, #ARGV do
  local at = (slot(ARGV[i]) % size) * 1024
  for j = 0, 7 do
    reads[#reads + 1] = 'GET'; reads[#reads + 1] = 'u32'; reads[#reads + 1] = at + j * 128
  end
end
local got = {}
for c = 1, #reads, 6000 do
  local part = redis.call('BITFIELD_RO', 'table', unpack(reads, c, math.min(c + 5999, #reads)))
  for _, v in ipairs(part) do got[#got + 1] = v end
end
local writes, n = {}, 0
for i = 3, #ARGV do
  local d = ARGV[i]
  local at = (slot(d) % size) * 1024
  local b5, b6, b7, b8 = string.byte(d, 5, 8)
  for j = 1, 8 do
    if got[(i - 3) * 8 + j] == 0 then
      local s = at + (j - 1) * 128
      writes[#writes + 1] = 'SET'; writes[#writes + 1] = 'u32'; writes[#writes + 1] = s
      writes[#writes + 1] = slot(d)
      writes[#writes + 1] = 'SET'; writes[#writes + 1] = 'u32'; writes[#writes + 1] = s + 32
      writes[#writes + 1] = ((b5 * 256 + b6) * 256 + b7) * 256 + b8
      writes[#writes + 1] = 'SET'; writes[#writes + 1] = 'u44'; writes[#writes + 1] = s + 64
      writes[#writes + 1] = tonumber(base)
      writes[#writes + 1] = 'SET'; writes[#writes + 1] = 'u20'; writes[#writes + 1] = s + 108
      writes[#writes + 1] = i
      n = n + 1
      break
    end
  end
end
for c = 1, #writes, 6000 do
  redis.call('BITFIELD', 'table', unpack(writes, c, math.min(c + 5999, #writes)))
end
return n
""",
    "hashtable": _PRELUDE
    + """
local by = {}
for i = 3, #ARGV do
  local sh = slot(ARGV[i]) % size
  local list = by[sh]
  if not list then list = {}; by[sh] = list end
  list[#list + 1] = i
end
local n = 0
for sh, list in pairs(by) do
  local h = 'big:' .. string.format('%d', sh)
  local ds = {}
  for k, i in ipairs(list) do ds[k] = ARGV[i] end
  local have = redis.call('HMGET', h, unpack(ds))
  local pairs_ = {}
  for k, i in ipairs(list) do
    if not have[k] then
      pairs_[#pairs_ + 1] = ARGV[i]
      pairs_[#pairs_ + 1] = string.format('%s-%d', base, i)
      n = n + 1
    end
  end
  if #pairs_ > 0 then redis.call('HSET', h, unpack(pairs_)) end
end
return n
""",
}


def _size(shape: str, records: int) -> int:
    """Shards or buckets for ``records``: ~24 a listpack hash; buckets half full."""
    if shape.startswith("hsetnx"):
        return max(1, records // (48 if shape == "hsetnx-48" else 24))
    if shape == "hashtable":
        return SHARDS_HT
    return max(1, records // 4)


def _cpu(r: redis.Redis) -> float:
    info: Any = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measure(r: redis.Redis, shape: str, records: int, batch: int) -> dict[str, float]:
    """One shape on an empty database: Redis CPU µs and bytes of ``used_memory`` per record."""
    r.flushall()
    size = _size(shape, records)
    script = r.register_script(SCRIPTS[shape])
    mem0: Any = r.info("memory")
    if shape in ("range", "bitfield"):  # the table allocated up front (counted), as a real one
        r.setrange("table", size * BUCKET - 1, b"\0")
    cpu0, stored = _cpu(r), 0
    for start in range(0, records, batch):
        digests = [os.urandom(8) for _ in range(min(batch, records - start))]
        stored += int(script(args=[size, 1764640000000, *digests]))
    cpu1 = _cpu(r)
    mem1: Any = r.info("memory")
    return {
        "cpu_us": (cpu1 - cpu0) / records * 1e6,
        "bytes": (int(mem1["used_memory"]) - int(mem0["used_memory"])) / records,
        "stored": stored / records,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=500, help="records per script call")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.records < 1 or a.rounds < 1 or not 1 <= a.batch <= 1000:
        p.error("--records and --rounds must be >= 1, --batch 1..1000")
    sys.path.insert(0, str(ROOT))
    from benchmarks.dedup_cost import machine
    from streamproc.embedded import EmbeddedRedis

    print(f"# dedup record shapes — {machine()}")
    print(f"# {a.records:,} records a shape a round, {a.batch} a script call, {a.rounds} round(s)")
    shapes = list(SCRIPTS)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in shapes}
    with tempfile.TemporaryDirectory(prefix="record-shapes-") as tmp:
        server = EmbeddedRedis(Path(tmp), appendonly=False).start()
        try:
            r = redis.Redis.from_url(server.url)
            for n in range(a.rounds):
                order = shapes[n % len(shapes) :] + shapes[: n % len(shapes)]
                for shape in order:
                    got = measure(r, shape, a.records, a.batch)
                    runs[shape].append(got)
                    print(
                        f"  round {n + 1} {shape}: {got['cpu_us']:.2f} µs, "
                        f"{got['bytes']:.1f} B, {got['stored']:.3f} stored a record",
                        flush=True,
                    )
            r.close()
        finally:
            server.stop()
    print("\n| shape | Redis CPU µs/record | / hsetnx (median of rounds) | B/record | stored |")
    print("|---|---:|---:|---:|---:|")
    summary: dict[str, dict[str, float]] = {}
    for shape in shapes:
        each = runs[shape]
        ratio = statistics.median(
            g["cpu_us"] / h["cpu_us"] for g, h in zip(each, runs["hsetnx"], strict=True)
        )
        summary[shape] = {
            "cpu_us": statistics.median(g["cpu_us"] for g in each),
            "ratio": ratio,
            "bytes": statistics.median(g["bytes"] for g in each),
            "stored": statistics.median(g["stored"] for g in each),
        }
        s = summary[shape]
        print(
            f"| {shape} | {s['cpu_us']:.2f} | {ratio:.2f} | {s['bytes']:.1f} | {s['stored']:.3f} |"
        )
    if a.json:
        a.json.write_text(json.dumps({"machine": machine(), "runs": runs, "summary": summary}))


if __name__ == "__main__":
    main()
