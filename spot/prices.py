"""A small table of EC2 prices, for the savings figures of the weekly report.

Hourly on-demand prices (USD, Linux, us-east-1, as published by AWS in 2025) of about twenty
common instance types. They are a yardstick for "what hibernation saved", not a bill: other
regions cost 5-30 % more, and the figure is the same for every region here.

Spot capacity is priced at a flat ``SPOT_DISCOUNT`` (70 %) below on-demand: AWS's spot
prices float per pool, and its own "savings over on-demand" averages sit around 70-90 %; 70 %
keeps the saving claimed for sleeping spot nodes on the low side.

An instance type not in the table costs ``0.0`` (its hours asleep are still counted, but no
dollars are claimed for them): better an under-stated saving than an invented one.
"""

from __future__ import annotations

from typing import Literal

__all__ = ("ON_DEMAND_USD_PER_HOUR", "SPOT_DISCOUNT", "Lifecycle", "hourly_usd")

Lifecycle = Literal["on-demand", "spot"]

#: Spot price = on-demand price x (1 - SPOT_DISCOUNT).
SPOT_DISCOUNT = 0.70

#: USD per hour, on-demand, Linux, us-east-1.
ON_DEMAND_USD_PER_HOUR: dict[str, float] = {
    "t3.micro": 0.0104,
    "t3.small": 0.0208,
    "t3.medium": 0.0416,
    "t3.large": 0.0832,
    "t3.xlarge": 0.1664,
    "m5.large": 0.096,
    "m5.xlarge": 0.192,
    "m5.2xlarge": 0.384,
    "m5.4xlarge": 0.768,
    "m6i.large": 0.096,
    "m6i.xlarge": 0.192,
    "m6g.large": 0.077,
    "m7i.large": 0.1008,
    "c5.large": 0.085,
    "c5.xlarge": 0.17,
    "c5.2xlarge": 0.34,
    "c6i.large": 0.085,
    "c6g.large": 0.068,
    "r5.large": 0.126,
    "r5.xlarge": 0.252,
    "r6i.large": 0.126,
    "g4dn.xlarge": 0.526,
    "g5.xlarge": 1.006,
    "p3.2xlarge": 3.06,
}


def hourly_usd(instance_type: str, lifecycle: str = "on-demand") -> float:
    """USD per hour of one instance of ``instance_type``; 0.0 when the type is unknown."""
    price = ON_DEMAND_USD_PER_HOUR.get(instance_type, 0.0)
    if lifecycle == "spot":
        return round(price * (1.0 - SPOT_DISCOUNT), 6)
    return price
