"""What discovery finds on AWS, as stored (``Instance``, ``EksCluster``) and the ``inventory.*``
events it emits when something is added, changed or removed.

The inventory of an account and region is kept in Redis by ``spot.discovery``:
``<p>:state:aws:inventory:<account>:<region>`` (hash instance id → ``Instance`` JSON) and
``<p>:state:aws:clusters:<account>:<region>`` (hash name → ``EksCluster`` JSON).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ("TYPES", "EksCluster", "Instance")


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


#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Any], ...] = ()
