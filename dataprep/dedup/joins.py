"""Joining items to a per-key value without a single-key bottleneck (hot keys via a side input)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsDict

METRICS_NAMESPACE = "dedup"
# Every GroupByKey group the dedup transforms iterate is recorded here; its max is the largest
# number of items any one worker held at once for one key.
GROUP_SIZE_METRIC = "join_group_size"
HOT_KEYS_METRIC = "hot_keys"


class _EmitCold(beam.DoFn):
    def __init__(self) -> None:
        self.group_size = Metrics.distribution(METRICS_NAMESPACE, GROUP_SIZE_METRIC)

    def process(self, element: tuple[Any, dict[str, list]]):
        key, grouped = element
        values = grouped["value"]
        if len(values) > 1:
            raise ValueError(f"AttachValue needs one value per key; key {key!r} has {len(values)}")
        items = grouped["items"]
        self.group_size.update(len(items))
        value = values[0] if values else None
        for payload in items:
            yield key, payload, value


def _split_hot(item: tuple[Any, Any], hot_keys: dict, hot_values: dict):
    key, payload = item
    if key in hot_keys:
        yield beam.pvalue.TaggedOutput("hot", (key, payload, hot_values.get(key)))
    else:
        yield item


class MinWithMembers(beam.CombineFn):
    """Per key: the minimum of all candidates and the items, kept only while there are at most
    `limit` of them (then the list is dropped and only the count survives). Inputs are
    (candidate, item-or-None); output (item count, minimum, items or None)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def create_accumulator(self) -> tuple[int, Any, list | None]:
        return 0, None, []

    def add_input(self, acc, element):
        count, low, items = acc
        candidate, item = element
        if low is None or candidate < low:
            low = candidate
        if item is not None:
            count += 1
            if items is not None:
                items.append(item)
                if len(items) > self.limit:
                    items = None
        return count, low, items

    def merge_accumulators(self, accs):
        count, low, items = 0, None, []
        for c, v, its in accs:
            count += c
            if v is not None and (low is None or v < low):
                low = v
            items = None if items is None or its is None else items + its
            if items is not None and len(items) > self.limit:
                items = None
        return count, low, items

    def extract_output(self, acc):
        return acc


class StarAggregate(beam.PTransform):
    """(key, (candidate, item-or-None)) -> `emit(key, minimum, item)` for every item, where
    `minimum` is the smallest candidate of the key: the "hang every member on the key's minimum"
    step of LSH buckets and of large-star/small-star, done by one lifted combiner.

    A key with at most `hot_key_threshold` items gets them back in its accumulator (the combiner
    never holds more); a hotter key keeps only its count and minimum, which are broadcast as a
    side input (at most items / threshold such keys) while its items are re-read one by one from
    `rescan`: (keys, item) elements, by default one per input item; a caller whose items sit under
    many keys (a document in all its band buckets) passes one element per item with all its keys,
    which is far cheaper to re-read. The item-list size of every cold key is recorded in the
    `join_group_size` distribution.
    """

    def __init__(self, emit: Callable[[Any, Any, Any], Iterable], hot_key_threshold: int,
                 rescan: beam.PCollection | None = None) -> None:
        super().__init__()
        self._emit = emit
        self._threshold = hot_key_threshold
        self._rescan = rescan

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        emit = self._emit
        group_size = Metrics.distribution(METRICS_NAMESPACE, GROUP_SIZE_METRIC)
        hot_counter = Metrics.counter(METRICS_NAMESPACE, HOT_KEYS_METRIC)

        def cold(key: Any, stats: tuple[int, Any, list | None]):
            count, low, items = stats
            if items is None:
                hot_counter.inc()
                yield beam.pvalue.TaggedOutput("hot", (key, low))
            else:
                group_size.update(len(items))
                for item in items:
                    yield from emit(key, low, item)

        def hot(element: tuple[Iterable, Any], minimums: dict):
            keys, item = element
            for key in keys:
                if key in minimums:
                    yield from emit(key, minimums[key], item)

        stats = (pcoll
                 | "MinWithMembers" >> beam.CombinePerKey(MinWithMembers(self._threshold))
                 | "Cold" >> beam.FlatMapTuple(cold).with_outputs("hot", main="emitted"))
        rescan = self._rescan
        if rescan is None:
            rescan = pcoll | "Rescan" >> beam.FlatMapTuple(
                lambda key, ci: [((key,), ci[1])] if ci[1] is not None else [])
        from_hot = rescan | "Hot" >> beam.FlatMap(hot, AsDict(stats.hot))
        return (stats.emitted, from_hot) | "Merge" >> beam.Flatten()


class AttachValue(beam.PTransform):
    """(key, payload) items -> (key, payload, value) with the one value of `values` for that key
    (None when it has none).

    Keys holding more than `hot_key_threshold` items are hot: their values (few: at most
    items / threshold of them) are broadcast as a side input and attached element by element; all
    other keys meet their value in a CoGroupByKey whose groups therefore hold at most
    `hot_key_threshold` items. Counting items per key is a lifted combiner (`Count.PerKey`), so
    no step ever gathers the items of a hot key on one worker.
    """

    def __init__(self, values: beam.PCollection, hot_key_threshold: int) -> None:
        super().__init__()
        self._values = values
        self._threshold = hot_key_threshold

    def expand(self, items: beam.PCollection) -> beam.PCollection:
        threshold = self._threshold
        hot_counter = Metrics.counter(METRICS_NAMESPACE, HOT_KEYS_METRIC)

        def is_hot(kv: tuple[Any, int]) -> bool:
            if kv[1] > threshold:
                hot_counter.inc()
                return True
            return False

        hot_keys = (items
                    | "CountPerKey" >> beam.combiners.Count.PerKey()
                    | "HotKeys" >> beam.Filter(is_hot))
        hot_values = self._values | "HotValues" >> beam.Filter(
            lambda kv, hot: kv[0] in hot, AsDict(hot_keys))
        split = items | "SplitHot" >> beam.FlatMap(
            _split_hot, AsDict(hot_keys), AsDict(hot_values)).with_outputs(
            "hot", main="cold")
        cold = ({"items": split.cold, "value": self._values}
                | "JoinCold" >> beam.CoGroupByKey()
                | "EmitCold" >> beam.ParDo(_EmitCold()))
        return (split.hot, cold) | "Merge" >> beam.Flatten()
