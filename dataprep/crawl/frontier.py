"""The frontier: per-origin queues (breadth-first) with politeness slots (gap and parallelism)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from dataprep.crawl.robots import RobotsRules
from dataprep.crawl.state import FrontierEntry
from dataprep.crawl.urls import origin


@dataclass
class OriginSlot:
    """One origin's queue and politeness state."""

    name: str
    delay_s: float
    queue: list[tuple[int, int, FrontierEntry]] = field(default_factory=list)  # (depth, seq, e)
    active: int = 0
    next_time: float = 0.0
    robots: RobotsRules | None = None  # None until robots.txt has been fetched
    robots_in_flight: bool = False


class Frontier:
    """URLs waiting to be fetched, grouped by origin so politeness is enforced per server."""

    def __init__(self, delay_s: float, per_origin: int) -> None:
        self.delay_s = delay_s
        self.per_origin = per_origin
        self.slots: dict[str, OriginSlot] = {}
        self._seq = 0
        self._size = 0

    def push(self, entry: FrontierEntry) -> None:
        key = origin(entry.url)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = OriginSlot(key, self.delay_s)
        self._seq += 1
        self._size += 1
        heapq.heappush(slot.queue, (entry.depth, self._seq, entry))

    def pop(self, slot: OriginSlot) -> FrontierEntry:
        """The origin's shallowest, earliest-queued URL."""
        self._size -= 1
        return heapq.heappop(slot.queue)[2]

    def __len__(self) -> int:
        return self._size

    def ready(self, now: float) -> Iterator[OriginSlot]:
        """Origins with queued URLs, a free slot and their politeness gap elapsed, longest-waiting
        first."""
        candidates = [s for s in self.slots.values()
                      if s.queue and s.active < self.per_origin and s.next_time <= now]
        yield from sorted(candidates, key=lambda s: s.next_time)

    def next_wake(self) -> float | None:
        """The earliest time a currently blocked origin becomes ready (None if none is waiting)."""
        times = [s.next_time for s in self.slots.values()
                 if s.queue and s.active < self.per_origin]
        return min(times) if times else None

    def start(self, slot: OriginSlot, now: float) -> None:
        # Starts are spaced by the gap too, so per_origin > 1 overlaps slow responses rather than
        # bursting N requests at once.
        slot.active += 1
        slot.next_time = max(slot.next_time, now + slot.delay_s)

    def finish(self, slot: OriginSlot, now: float) -> None:
        slot.active -= 1
        slot.next_time = max(slot.next_time, now + slot.delay_s)

    def apply_crawl_delay(self, slot: OriginSlot, crawl_delay: float | None, cap: float) -> None:
        """A robots.txt Crawl-delay raises (never lowers) the origin's gap, up to `cap`."""
        if crawl_delay is not None:
            slot.delay_s = max(self.delay_s, min(crawl_delay, cap))
