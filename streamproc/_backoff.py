"""Capped exponential backoff with jitter, for reconnect loops."""

from __future__ import annotations

import asyncio
import random

__all__ = ("Backoff", "backoff_delay_s")


def backoff_delay_s(attempt: int, base_s: float, cap_s: float) -> float:
    """``min(cap, base * 2**(attempt-1))`` scaled by U(0.5, 1): exponential, jittered, capped."""
    return float(min(cap_s, base_s * 2.0 ** max(attempt - 1, 0)) * random.uniform(0.5, 1.0))


class Backoff:
    def __init__(self, base_s: float = 0.05, cap_s: float = 5.0) -> None:
        self.base_s, self.cap_s, self.attempt = base_s, cap_s, 0

    async def sleep(self) -> None:
        self.attempt += 1
        await asyncio.sleep(backoff_delay_s(self.attempt, self.base_s, self.cap_s))

    def reset(self) -> None:
        self.attempt = 0
