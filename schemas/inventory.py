"""What discovery finds on AWS, as stored (``Instance``, ``EksCluster``) and the ``inventory.*``
events it emits when something is added, changed or removed.

The inventory of an account and region is kept in Redis by ``spot.discovery``:
``<p>:state:{aws}:inventory:<account>:<region>`` (hash instance id → ``Instance`` JSON) and
``<p>:state:{aws}:clusters:<account>:<region>`` (hash name → ``EksCluster`` JSON).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

from streamproc.event import Event

__all__ = (
    "TYPES",
    "ClusterAdded",
    "ClusterChanged",
    "ClusterRemoved",
    "EksCluster",
    "Instance",
    "InstanceAdded",
    "InstanceChanged",
    "InstanceRemoved",
)


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    instance_type: str
    state: str
    availability_zone: str = ""
    lifecycle: Literal["spot", "on-demand"] = "on-demand"
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    #: The EKS/Kubernetes cluster it belongs to (tag ``eks:cluster-name`` or
    #: ``kubernetes.io/cluster/<name>``), else "".
    cluster: str = ""
    launch_time: str = ""
    #: Average CPU % over the last scan's window (CloudWatch), when running.
    cpu_avg: float | None = None


class EksCluster(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    status: str = ""
    version: str = ""
    arn: str = ""


class _Change(Event, frozen=True, kw_only=True):
    """What every ``inventory.*`` event says: where. Its ``key`` is the account id, its ``id``
    derived from the tick's id, the account, region, resource and the change itself, so a
    scan that runs again for the same tick publishes nothing new."""

    topic: ClassVar[str] = "inventory"
    #: Only discovery publishes these.
    external: ClassVar[bool] = False
    account_id: str
    region: str
    #: The ``tick.discovery`` that found it.
    cause_id: str = ""


class InstanceAdded(_Change, frozen=True, kw_only=True, tag="inventory.instance_added"):
    instance: Instance


class InstanceChanged(_Change, frozen=True, kw_only=True, tag="inventory.instance_changed"):
    """Its state, type or tags changed (``changed`` names which)."""

    instance_id: str
    changed: tuple[str, ...] = ()
    before: Instance
    after: Instance


class InstanceRemoved(_Change, frozen=True, kw_only=True, tag="inventory.instance_removed"):
    """Terminated, or no longer listed at all (``reason``)."""

    instance_id: str
    reason: Literal["terminated", "gone"] = "gone"
    before: Instance


class ClusterAdded(_Change, frozen=True, kw_only=True, tag="inventory.cluster_added"):
    cluster: EksCluster


class ClusterChanged(_Change, frozen=True, kw_only=True, tag="inventory.cluster_changed"):
    """Its status or Kubernetes version changed (``changed`` names which)."""

    name: str
    changed: tuple[str, ...] = ()
    before: EksCluster
    after: EksCluster


class ClusterRemoved(_Change, frozen=True, kw_only=True, tag="inventory.cluster_removed"):
    name: str
    before: EksCluster


#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Any], ...] = (
    InstanceAdded,
    InstanceChanged,
    InstanceRemoved,
    ClusterAdded,
    ClusterChanged,
    ClusterRemoved,
)
