"""The frontier: per-host queues (breadth-first) with politeness slots (gap and parallelism).

Politeness is per host, not per origin: `http://x/` and `https://x/` are one server to be gentle
with. robots.txt is per origin (RFC 9309), so a host slot holds the rules of each of its origins.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from dataprep.crawl.robots import RobotsRules
from dataprep.crawl.state import FrontierEntry
from dataprep.crawl.urls import host_of, origin


@dataclass
class HostSlot:
    """One host's queue and politeness state."""

    host: str
    delay_s: float
    queue: list[tuple[int, int, FrontierEntry]] = field(default_factory=list)  # (depth, seq, e)
    active: int = 0
    next_time: float = 0.0
    robots: dict[str, RobotsRules] = field(default_factory=dict)  # origin -> its rules
    robots_pending: set[str] = field(default_factory=set)  # origins whose robots.txt is in flight

    def head(self) -> FrontierEntry:
        return self.queue[0][2]


class Frontier:
    """URLs waiting to be fetched, grouped by host so politeness is enforced per server."""

    def __init__(self, delay_s: float, per_host: int) -> None:
        self.delay_s = delay_s
        self.per_host = per_host
        self.slots: dict[str, HostSlot] = {}
        self._seq = 0
        self._size = 0

    def push(self, entry: FrontierEntry) -> None:
        host = host_of(entry.url)
        slot = self.slots.get(host)
        if slot is None:
            slot = self.slots[host] = HostSlot(host, self.delay_s)
        self._seq += 1
        self._size += 1
        heapq.heappush(slot.queue, (entry.depth, self._seq, entry))

    def pop(self, slot: HostSlot) -> FrontierEntry:
        """The host's shallowest, earliest-queued URL."""
        self._size -= 1
        return heapq.heappop(slot.queue)[2]

    def __len__(self) -> int:
        return self._size

    def ready(self, now: float) -> Iterator[HostSlot]:
        """Hosts that can start a request now (see `_can_start`), longest-waiting first."""
        candidates = [s for s in self.slots.values() if self._can_start(s) and s.next_time <= now]
        yield from sorted(candidates, key=lambda s: s.next_time)

    def next_wake(self) -> float | None:
        """When the next host can start a request; None while every host is busy or empty."""
        times = [s.next_time for s in self.slots.values() if self._can_start(s)]
        return min(times) if times else None

    def _can_start(self, slot: HostSlot) -> bool:
        # A host whose next URL waits for its origin's robots.txt has nothing to start yet.
        return bool(slot.queue) and slot.active < self.per_host and (
            origin(slot.head().url) not in slot.robots_pending)

    def start(self, slot: HostSlot, now: float) -> None:
        # Starts are spaced by the gap too, so per_host > 1 overlaps slow responses rather than
        # bursting N requests at once.
        slot.active += 1
        slot.next_time = max(slot.next_time, now + slot.delay_s)

    def finish(self, slot: HostSlot, now: float) -> None:
        slot.active -= 1
        slot.next_time = max(slot.next_time, now + slot.delay_s)

    def apply_crawl_delay(self, slot: HostSlot, crawl_delay: float | None, cap: float) -> None:
        """A robots.txt Crawl-delay raises (never lowers) the host's gap, up to `cap`."""
        if crawl_delay is not None:
            slot.delay_s = max(slot.delay_s, min(crawl_delay, cap))
