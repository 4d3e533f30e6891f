"""Joining items to a per-key value without a single-key bottleneck (hot keys via a side input)."""

from __future__ import annotations

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


class CountAndMin(beam.CombineFn):
    """(number of values flagged as items, minimum of all values) over (is_item, value) inputs:
    the per-key item count `AttachValue` needs and the minimum it attaches, in one lifted combine."""

    def create_accumulator(self) -> tuple[int, Any]:
        return 0, None

    def add_input(self, acc: tuple[int, Any], element: tuple[bool, Any]) -> tuple[int, Any]:
        is_item, value = element
        count, low = acc
        return count + is_item, value if low is None or value < low else low

    def merge_accumulators(self, accs) -> tuple[int, Any]:
        count, low = 0, None
        for c, v in accs:
            count += c
            if v is not None and (low is None or v < low):
                low = v
        return count, low

    def extract_output(self, acc: tuple[int, Any]) -> tuple[int, Any]:
        return acc


def split_count_and_min(stats: beam.PCollection, label: str):
    """(key, (count, min)) -> the `counts` and `values` collections `AttachValue` takes."""
    counts = stats | f"{label}Counts" >> beam.MapTuple(lambda k, cm: (k, cm[0]))
    values = stats | f"{label}Mins" >> beam.MapTuple(lambda k, cm: (k, cm[1]))
    return counts, values


class AttachValue(beam.PTransform):
    """(key, payload) items -> (key, payload, value) with the one value of `values` for that key
    (None when it has none).

    Keys holding more than `hot_key_threshold` items are hot: their values (few: at most
    items / threshold of them) are broadcast as a side input and attached element by element; all
    other keys meet their value in a CoGroupByKey whose groups therefore hold at most
    `hot_key_threshold` items. Counting items per key is a lifted combiner (`Count.PerKey`), so
    no step ever gathers the items of a hot key on one worker. A caller that already has the
    per-key item counts (from the combiner that made `values`) passes them as `counts`.
    """

    def __init__(self, values: beam.PCollection, hot_key_threshold: int,
                 counts: beam.PCollection | None = None) -> None:
        super().__init__()
        self._values = values
        self._threshold = hot_key_threshold
        self._counts = counts

    def expand(self, items: beam.PCollection) -> beam.PCollection:
        threshold = self._threshold
        hot_counter = Metrics.counter(METRICS_NAMESPACE, HOT_KEYS_METRIC)

        def is_hot(kv: tuple[Any, int]) -> bool:
            if kv[1] > threshold:
                hot_counter.inc()
                return True
            return False

        counts = self._counts
        if counts is None:
            counts = items | "CountPerKey" >> beam.combiners.Count.PerKey()
        hot_keys = counts | "HotKeys" >> beam.Filter(is_hot)
        hot_values = self._values | "HotValues" >> beam.Filter(
            lambda kv, hot: kv[0] in hot, AsDict(hot_keys))
        split = items | "SplitHot" >> beam.FlatMap(
            _split_hot, AsDict(hot_keys), AsDict(hot_values)).with_outputs(
            "hot", main="cold")
        cold = ({"items": split.cold, "value": self._values}
                | "JoinCold" >> beam.CoGroupByKey()
                | "EmitCold" >> beam.ParDo(_EmitCold()))
        return (split.hot, cold) | "Merge" >> beam.Flatten()
