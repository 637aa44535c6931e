"""Per-key order with concurrency: one lane per event key (``Concern(ordered=True)``).

Within one consumer, entries of one topic with the same ``key`` field run one after another
in the order they were read (stream order), entries of other keys in parallel up to the
concern's ``concurrency``. A lane lets its next entry run as soon as the one before it was
handled, when that outcome is final (acked without effects, dead-lettered, a duplicate...);
after an outcome its settle may still turn into a retry (effects, which Redis may refuse) or
that is a retry, the next entry waits for the settle, so that it never runs before a retry
of the entry ahead of it is held. Entries with an empty key are not ordered (no lane).
Waiting entries are held by the reader like running ones: they count against
``max_in_flight`` and are renewed, so memory stays bounded and a crash leaves them pending
for a successor.

Across retries (``hold_on_retry``, the default) the order is kept in Redis, so that every
consumer of the group respects it: the settle script that schedules a keyed entry's retry
also writes ``hold[key] = origin id`` (``Keys.hold``). Entries of a held key are *parked*:
acked in their stream and appended, in order, to the key's parked list (``Keys.parked``) by
the PARK script, which does nothing once the key is free. The head's final settle (ack or
dead letter) releases the key: the next parked entry goes to the retry stream and becomes the
head, or the hold is removed when none is left. A lane is *blocked* after its running entry
was retried, and when the gate (an HMGET of the hold hash per read batch) finds its key held:
its queue then goes through PARK before anything runs. An entry whose origin is the hold's
value is the head and runs first.

This module keeps the in-process state only; the runtime calls Redis and feeds the workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from streamproc.consumer.outcomes import Entry

__all__ = ("LaneKey", "Lanes", "lane_key")

#: (topic, event key): order is per stream; the same key on two topics is two lanes.
LaneKey = tuple[str, bytes]


def lane_key(entry: Entry) -> LaneKey | None:
    """The entry's lane, or None when it has an empty key (not ordered)."""
    k = entry.fields.get(b"key")
    return (entry.topic, k) if k else None


class _Lane:
    __slots__ = ("blocked", "queue", "running")

    def __init__(self) -> None:
        self.queue: deque[Entry] = deque()
        self.running: Entry | None = None
        #: The queue must go through PARK before its entries may run (the key is or may be
        #: held in Redis).
        self.blocked = False


class Lanes:
    """The lanes of one consumer. Every method returns the entries that may run now."""

    __slots__ = ("_heads", "_lanes", "to_park", "waiting")

    def __init__(self) -> None:
        self._lanes: dict[LaneKey, _Lane] = {}
        self._heads: set[Entry] = set()  # queued entries known to head their key
        #: Lanes whose queue waits for PARK (an ordered set: first come, first parked).
        self.to_park: dict[LaneKey, None] = {}
        #: Entries queued in lanes (not running).
        self.waiting = 0

    def __len__(self) -> int:
        return len(self._lanes)

    def add(self, entry: Entry, holds: Mapping[LaneKey, bytes]) -> Entry | None:
        """Queue an entry read from Redis; ``holds``: the hold hash's values by lane."""
        k = lane_key(entry)
        if k is None:
            return entry
        hold = holds.get(k)
        lane = self._lanes.get(k)
        if lane is None:
            lane = self._lanes[k] = _Lane()
        if hold is not None and hold == entry.origin:
            lane.queue.appendleft(entry)  # the head: before everything else of its key
            self._heads.add(entry)
        else:
            if hold is not None:
                lane.blocked = True
            lane.queue.append(entry)
        self.waiting += 1
        return self._advance(k, lane)

    def handled(self, entry: Entry) -> Entry | None:
        """The entry's handler ended in an outcome its settle cannot turn into a retry (the
        caller decides): the next entry of the key may run now, before that settle. Not in a
        blocked lane, whose head's settle must first release the key."""
        k = lane_key(entry)
        lane = self._lanes.get(k) if k is not None else None
        if lane is None or lane.running is not entry or lane.blocked:
            return None
        lane.running = None
        return self._advance(k, lane)  # type: ignore[arg-type]

    def settled(self, entry: Entry, retried: bool) -> Entry | None:
        """The entry's settle is done; ``retried``: it was (or may have been) scheduled for
        retry, so its key may be held now."""
        k = lane_key(entry)
        lane = self._lanes.get(k) if k is not None else None
        if lane is None or lane.running is not entry:
            return None
        lane.running = None
        if retried:
            lane.blocked = True
        return self._advance(k, lane)  # type: ignore[arg-type]

    def parking(self) -> list[tuple[LaneKey, list[Entry]]]:
        """Take the lanes waiting for PARK: each with its queued entries up to the first head."""
        out: list[tuple[LaneKey, list[Entry]]] = []
        for k in self.to_park:
            lane = self._lanes.get(k)
            if lane is None or not lane.blocked:
                continue
            batch: list[Entry] = []
            for e in lane.queue:
                if e in self._heads:
                    break
                batch.append(e)
            if batch:
                out.append((k, batch))
        self.to_park.clear()
        return out

    def retry_parking(self, keys: list[LaneKey]) -> None:
        """A PARK call failed: these lanes wait for the next one."""
        for k in keys:
            self.to_park[k] = None

    def parked(
        self, k: LaneKey, sent: list[Entry], codes: list[int]
    ) -> tuple[list[Entry], Entry | None]:
        """Apply PARK's reply: returns (entries that left: parked or no longer pending, the
        entry that may run now)."""
        lane = self._lanes.get(k)
        if lane is None:
            return [], None
        gone: list[Entry] = []
        for e, code in zip(sent, codes, strict=False):
            if code == -1:  # the key is free: the queue runs in order from here
                lane.blocked = False
                break
            if code == -2:  # it heads the key
                self._heads.add(e)
                lane.queue.remove(e)
                lane.queue.appendleft(e)
                break
            lane.queue.remove(e)
            self.waiting -= 1
            gone.append(e)
        return gone, self._advance(k, lane)

    def _advance(self, k: LaneKey, lane: _Lane) -> Entry | None:
        q, run = lane.queue, None
        if lane.running is None and q and (not lane.blocked or q[0] in self._heads):
            run = lane.running = q.popleft()
            self._heads.discard(run)
            self.waiting -= 1
        if lane.blocked and q and q[0] not in self._heads:
            self.to_park[k] = None
        elif lane.running is None and not q:
            del self._lanes[k]  # a held key's state lives in Redis; the gate finds it again
        return run
