"""Per-cluster optimizer policies: which instance families it may use, how much of the cluster
may run on spot, and whether it may act on AWS at all (``dry_run``, on by default).

Stored in one hash, ``<p>:state:optimizer:policies`` (cluster id → ``Policy`` JSON); managed
with ``streamproc policy set|show|list`` and ``GET/PUT /v1/clusters/{id}/policy`` (operators).
A cluster without a policy gets ``Policy()``: the families it already runs, 70 % spot at most,
dry run.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
import redis.asyncio as aioredis

from streamproc.errors import ConfigError
from streamproc.keys import Keys

__all__ = ("CLUSTER_RE", "Policy", "PolicyStore", "check_cluster", "new_policy")

#: A cluster id as paths and the inventory name them (EKS names: letters, digits, ``-_``).
CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_FAMILY_RE = re.compile(r"[a-z][a-z0-9-]{0,15}")

Family = Annotated[str, msgspec.Meta(pattern=_FAMILY_RE.pattern + "$", max_length=16)]


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Instance families spot capacity may come from (``m5``, ``c6i``); empty = the families
    #: the cluster runs now.
    families: Annotated[list[Family], msgspec.Meta(max_length=30)] = msgspec.field(
        default_factory=list
    )
    #: The most of the cluster's running instances that may be spot (0..1).
    max_spot_share: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.7
    #: Plan only: never change an Auto Scaling group. Off only on purpose.
    dry_run: bool = True
    updated_by: Annotated[str, msgspec.Meta(max_length=128)] = ""


def check_cluster(cluster_id: str) -> str:
    if not CLUSTER_RE.fullmatch(cluster_id):
        raise ConfigError(f"cluster: {cluster_id[:60]!r} is not a cluster id")
    return cluster_id


def new_policy(**fields: Any) -> Policy:
    """A checked policy from loose values (the CLI); ``ConfigError("field: reason")``."""
    try:
        return msgspec.convert(fields, Policy)
    except msgspec.ValidationError as e:
        text, _, path = str(e).partition(" - at `$.")
        raise ConfigError(f"{path.rstrip('`') or 'policy'}: {text}") from None


class PolicyStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self._key = keys.state("optimizer", "policies")
        self._decoder = msgspec.json.Decoder(Policy)

    async def get(self, cluster_id: str) -> Policy:
        """The cluster's policy, or the default one."""
        raw: Any = await self.client.hget(self._key, cluster_id)
        if not raw:
            return Policy()
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError:  # written by something else: the safe default (dry run)
            return Policy()

    async def put(self, cluster_id: str, policy: Policy) -> None:
        await self.client.hset(self._key, check_cluster(cluster_id), msgspec.json.encode(policy))

    async def remove(self, cluster_id: str) -> bool:
        return bool(await self.client.hdel(self._key, cluster_id))

    async def all(self) -> dict[str, Policy]:
        raw: Any = await self.client.hgetall(self._key)
        out = {}
        for k, v in raw.items():
            try:
                out[k.decode()] = self._decoder.decode(v)
            except msgspec.DecodeError:
                continue
        return dict(sorted(out.items()))
