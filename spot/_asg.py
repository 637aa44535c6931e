"""Auto Scaling calls of hibernation (blocking: each runs in ``Aws.call``'s worker thread).

A cluster's node groups are the Auto Scaling groups tagged ``kubernetes.io/cluster/<name>``
(any value: ``owned``/``shared``, as eksctl, kops and the EKS docs tag them) or
``eks:cluster-name=<name>`` (managed node groups), unless its schedule lists them by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from spot.hibernation_store import AsgSizes

__all__ = ("by_name", "cluster_groups", "describe_all", "set_sizes", "sizes_of")


def describe_all(client: Any) -> list[dict[str, Any]]:
    """Every Auto Scaling group of the client's region (paginated), with the instance type of
    the launch configurations that name one."""
    groups: list[dict[str, Any]] = []
    for page in client.get_paginator("describe_auto_scaling_groups").paginate():
        groups += page.get("AutoScalingGroups", [])
    configs = sorted(
        {
            g["LaunchConfigurationName"]
            for g in groups
            if g.get("LaunchConfigurationName") and not _types_of_instances(g)
        }
    )
    types: dict[str, str] = {}
    for i in range(0, len(configs), 50):
        page = client.describe_launch_configurations(LaunchConfigurationNames=configs[i : i + 50])
        for lc in page.get("LaunchConfigurations", []):
            types[lc["LaunchConfigurationName"]] = lc.get("InstanceType", "")
    for g in groups:
        lc_type = types.get(g.get("LaunchConfigurationName", ""), "")
        if lc_type:
            g["_instance_type"] = lc_type
    return groups


def by_name(groups: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {g["AutoScalingGroupName"]: g for g in groups}


def cluster_groups(
    groups: Iterable[dict[str, Any]], cluster: str, names: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The groups of ``cluster``: those listed in ``names``, else those tagged with it."""
    if names:
        wanted = set(names)
        return [g for g in groups if g["AutoScalingGroupName"] in wanted]
    k8s = f"kubernetes.io/cluster/{cluster}"
    out = []
    for g in groups:
        for tag in g.get("Tags", ()):
            key = tag.get("Key")
            if key == k8s or (key == "eks:cluster-name" and tag.get("Value") == cluster):
                out.append(g)
                break
    return out


def _types_of_instances(group: dict[str, Any]) -> Counter[str]:
    return Counter(i["InstanceType"] for i in group.get("Instances", ()) if i.get("InstanceType"))


def sizes_of(group: dict[str, Any]) -> AsgSizes:
    """The group's sizes now, with the type most of its instances have and its lifecycle.

    The instance type comes from its instances, else its launch configuration, else the first
    override of its mixed-instances policy. Lifecycle is ``spot`` when its mixed-instances
    policy puts no on-demand capacity above the base, else ``on-demand``.
    """
    counted = _types_of_instances(group)
    instance_type = counted.most_common(1)[0][0] if counted else group.get("_instance_type", "")
    lifecycle = "on-demand"
    mixed = group.get("MixedInstancesPolicy")
    if mixed:
        dist = mixed.get("InstancesDistribution", {})
        if dist.get("OnDemandPercentageAboveBaseCapacity", 100) == 0 and not dist.get(
            "OnDemandBaseCapacity", 0
        ):
            lifecycle = "spot"
        if not instance_type:
            overrides = mixed.get("LaunchTemplate", {}).get("Overrides", [])
            instance_type = next((o["InstanceType"] for o in overrides if "InstanceType" in o), "")
    return AsgSizes(
        min=int(group["MinSize"]),
        max=int(group["MaxSize"]),
        desired=int(group["DesiredCapacity"]),
        instance_type=instance_type,
        lifecycle=lifecycle,
    )


def set_sizes(client: Any, name: str, *, min: int, max: int, desired: int) -> None:
    client.update_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=min, MaxSize=max, DesiredCapacity=desired
    )
