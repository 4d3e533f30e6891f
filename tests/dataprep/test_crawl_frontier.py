"""Frontier scheduling: breadth-first per host, politeness gaps and per-host parallelism."""

from __future__ import annotations

from dataprep.crawl.frontier import Frontier
from dataprep.crawl.state import FrontierEntry


def test_each_host_is_served_shallowest_first_then_in_queue_order() -> None:
    frontier = Frontier(delay_s=0.0, per_host=1)
    for url, depth in [("http://a.example/3", 2), ("http://a.example/1", 1),
                       ("http://a.example/2", 1), ("http://a.example/0", 0)]:
        frontier.push(FrontierEntry(url, depth))
    slot = frontier.slots["a.example"]
    assert [frontier.pop(slot).url for _ in range(4)] == [
        "http://a.example/0", "http://a.example/1", "http://a.example/2", "http://a.example/3"]
    assert len(frontier) == 0


def test_http_and_https_of_one_host_share_its_politeness_slot() -> None:
    frontier = Frontier(delay_s=1.0, per_host=1)
    frontier.push(FrontierEntry("http://a.example/x", 0))
    frontier.push(FrontierEntry("https://a.example/y", 0))
    frontier.push(FrontierEntry("http://b.example/z", 0))
    assert sorted(frontier.slots) == ["a.example", "b.example"]


def test_gap_and_parallelism_limit_when_a_host_is_ready() -> None:
    frontier = Frontier(delay_s=2.0, per_host=1)
    frontier.push(FrontierEntry("http://a.example/1", 0))
    frontier.push(FrontierEntry("http://a.example/2", 0))
    slot = frontier.slots["a.example"]
    assert list(frontier.ready(now=100.0)) == [slot]
    frontier.start(slot, now=100.0)
    frontier.pop(slot)
    assert list(frontier.ready(now=100.0)) == []  # busy: one request at a time
    assert frontier.next_wake() is None
    frontier.finish(slot, now=105.0)
    assert list(frontier.ready(now=106.9)) == []  # the gap runs from the end of the request
    assert frontier.next_wake() == 107.0
    assert list(frontier.ready(now=107.0)) == [slot]


def test_two_per_host_still_spaces_request_starts() -> None:
    frontier = Frontier(delay_s=1.0, per_host=2)
    for n in range(3):
        frontier.push(FrontierEntry(f"http://a.example/{n}", 0))
    slot = frontier.slots["a.example"]
    frontier.start(slot, now=10.0)
    assert list(frontier.ready(now=10.5)) == []
    assert list(frontier.ready(now=11.0)) == [slot]


def test_crawl_delay_raises_the_gap_within_the_cap() -> None:
    frontier = Frontier(delay_s=1.0, per_host=1)
    frontier.push(FrontierEntry("http://a.example/", 0))
    slot = frontier.slots["a.example"]
    frontier.apply_crawl_delay(slot, 0.2, cap=30.0)
    assert slot.delay_s == 1.0  # a smaller Crawl-delay never makes us faster than configured
    frontier.apply_crawl_delay(slot, 5.0, cap=30.0)
    assert slot.delay_s == 5.0
    frontier.apply_crawl_delay(slot, 3600.0, cap=30.0)
    assert slot.delay_s == 30.0
