"""Distributed connected components: alternating large-star / small-star rounds (Kiveris et al.,
"Connected Components in MapReduce and Beyond", SoCC 2014) as Beam combiners and joins.

Nodes are any totally ordered values (the dedup transforms use survivor ranks, so the minimum of a
component is its survivor). Per round, with Γ(u) the neighbours of u and m(u) = min(Γ(u) ∪ {u}):

- large-star: every edge (a < b) becomes (m(a), b): each node hangs its larger neighbours on the
  smallest node it sees;
- small-star: with m(b) = min of b and its smaller neighbours, every edge (a < b) becomes
  (m(b), a) and (m(b), b) (self-loops dropped).

Both preserve connectivity and the set of nodes; the graph is converged when every component is a
star around its minimum, after which both steps are the identity. Each step is one
`StarAggregate`: a lifted combiner computes m(u) and hands back u's items only while there are at
most `hot_key_threshold` of them; a hub with more is served through a side input, so its
neighbours are never grouped on one worker.

The paper bounds the alternation by O(log^2 n) rounds and observes O(log n) in practice (measured
here: a path of n nodes in random order needs 5 rounds at n = 64, 9 at 1,000, 13-14 at 100,000; a
random tree of 100,000 nodes 7-8; LSH star graphs of near-duplicates 1-2). A Beam graph is
static, so `max_rounds` rounds are unrolled (extra rounds on a converged graph are no-ops). After the last round a lifted per-node combiner counts the nodes still
violating the star shape (metric `cc_unconverged_nodes`); if any remain the pipeline fails with an
error naming `max_cc_rounds` rather than emitting wrong components.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from dataprep.dedup.joins import METRICS_NAMESPACE, StarAggregate


def _ordered(a: Any, b: Any) -> tuple[Any, Any]:
    return (a, b) if a < b else (b, a)


def _large_star_inputs(edge: tuple[Any, Any]):
    a, b = edge
    yield a, (b, b)  # b is a larger neighbour of a: an item to hang on m(a)
    yield b, (a, None)  # a counts towards m(b) only


def _hang_larger(a: Any, m: Any, b: Any):
    yield min(a, m), b


def _hang_smaller(b: Any, m: Any, a: Any):
    yield m, b
    if a != m:
        yield m, a


class _LargeStar(beam.PTransform):
    def __init__(self, hot_key_threshold: int) -> None:
        super().__init__()
        self._threshold = hot_key_threshold

    def expand(self, edges: beam.PCollection) -> beam.PCollection:
        # duplicates left here are removed after the small-star that follows
        return (edges
                | "Inputs" >> beam.FlatMap(_large_star_inputs)
                | "Hang" >> StarAggregate(_hang_larger, self._threshold))


class _SmallStar(beam.PTransform):
    def __init__(self, hot_key_threshold: int) -> None:
        super().__init__()
        self._threshold = hot_key_threshold

    def expand(self, edges: beam.PCollection) -> beam.PCollection:
        return (edges
                | "Inputs" >> beam.MapTuple(lambda a, b: (b, (a, a)))
                | "Hang" >> StarAggregate(_hang_smaller, self._threshold)
                | "Distinct" >> beam.Distinct())


class _StarViolations(beam.PTransform):
    """Number of nodes that break the converged shape: a node that is some edge's larger end must
    be so exactly once and never a smaller end."""

    def expand(self, edges: beam.PCollection) -> beam.PCollection:
        def roles(edge: tuple[Any, Any]):
            yield edge[0], (1, 0)
            yield edge[1], (0, 1)

        def violates(counts: tuple[int, int]) -> int:
            as_small, as_large = counts
            return int(as_large > 1 or (as_large > 0 and as_small > 0))

        return (edges
                | "Roles" >> beam.FlatMap(roles)
                | "PerNode" >> beam.CombinePerKey(
                    lambda vs: tuple(map(sum, zip(*vs, strict=True))))
                | "Violates" >> beam.Map(lambda kv: violates(kv[1]))
                | "Count" >> beam.CombineGlobally(sum))


class _CheckConverged(beam.DoFn):
    def __init__(self, max_rounds: int) -> None:
        self.counter = Metrics.counter(METRICS_NAMESPACE, "cc_unconverged_nodes")
        self.max_rounds = max_rounds

    def process(self, violations: int):
        self.counter.inc(violations)
        if violations:
            raise RuntimeError(
                f"connected components did not converge in {self.max_rounds} large-star/small-star "
                f"rounds ({violations} nodes are not yet in a star); raise max_cc_rounds")
        return []


class ConnectedComponents(beam.PTransform):
    """Undirected edges (a, b), a != b -> (root, node) for every node that is not its component's
    root, the root being the component's minimum node."""

    def __init__(self, max_rounds: int, hot_key_threshold: int) -> None:
        super().__init__()
        self._max_rounds = max_rounds
        self._threshold = hot_key_threshold

    def expand(self, edges: beam.PCollection) -> beam.PCollection:
        edges = (edges
                 | "Order" >> beam.MapTuple(_ordered)
                 | "Distinct" >> beam.Distinct())
        for i in range(1, self._max_rounds + 1):
            edges = (edges
                     | f"LargeStar{i}" >> _LargeStar(self._threshold)
                     | f"SmallStar{i}" >> _SmallStar(self._threshold))
        _ = (edges
             | "Violations" >> _StarViolations()
             | "Check" >> beam.ParDo(_CheckConverged(self._max_rounds)))
        return edges
