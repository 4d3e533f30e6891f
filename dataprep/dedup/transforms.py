"""The dedup stages as Beam composites: `ExactDedup`, `MinHashDedup`, `Decontaminate`.

Each takes a `PCollection[dict]` of documents (see `dataprep.dedup.records`) and returns a dict of
PCollections: `kept` (the documents, unchanged; in decontamination flag mode with `flags` extended
by "decontamination"), `duplicates` (`{"id", "duplicate_of", "stage", "similarity"}`), `errors`
(`{"id", "stage", "reason", "record"}` for records without a usable id/text/quality) and, for
`Decontaminate`, `flagged` (records shaped like `duplicates` for documents kept with a flag).
For every stage `input == kept + duplicates + errors`.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, TaggedOutput

from dataprep.dedup import minhash as mh
from dataprep.dedup.components import ConnectedComponents
from dataprep.dedup.decontam import (
    DecontamConfig,
    build_eval_index,
    contamination,
    document_ngrams,
)
from dataprep.dedup.exact import ExactDedupConfig, exact_key
from dataprep.dedup.joins import (
    GROUP_SIZE_METRIC,
    METRICS_NAMESPACE,
    AttachValue,
    StarAggregate,
)
from dataprep.dedup.records import (
    DECONTAM_STAGE,
    EXACT_STAGE,
    MINHASH_STAGE,
    duplicate_record,
    error_record,
    invalid_reason,
    survivor_rank,
)
from kiln.log import get_logger

log = get_logger(__name__)


class ExactDedup(beam.PTransform):
    """One document per normalised text survives: the best quality, then the smallest id."""

    def __init__(self, config: ExactDedupConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, docs: beam.PCollection) -> dict[str, beam.PCollection]:
        normalization = self.config.normalization

        def keyed(doc: Any):
            reason = invalid_reason(doc)
            if reason:
                yield TaggedOutput("errors", error_record(doc, EXACT_STAGE, reason))
            else:
                yield exact_key(doc["text"], normalization), doc

        def split(key: bytes, doc: dict, best: tuple):
            if survivor_rank(doc) == best:
                yield doc
            else:
                yield TaggedOutput("duplicates",
                                   duplicate_record(doc["id"], best[1], EXACT_STAGE, 1.0))

        prep = docs | "Key" >> beam.FlatMap(keyed).with_outputs("errors", main="docs")
        best = (prep.docs
                | "Rank" >> beam.MapTuple(lambda key, doc: (key, survivor_rank(doc)))
                | "Best" >> beam.CombinePerKey(min))
        out = (prep.docs
               | "AttachBest" >> AttachValue(best, self.config.hot_key_threshold)
               | "Split" >> beam.FlatMapTuple(split).with_outputs("duplicates", main="kept"))
        return {"kept": out.kept, "duplicates": out.duplicates, "errors": prep.errors}


class _MinHashPrepare(beam.DoFn):
    """Per document: its node (survivor rank), its band keys, and the payload verification reads
    (the shingle set, or the signature when `verify` is off)."""

    def __init__(self, config: mh.MinHashConfig) -> None:
        self.config = config

    def process(self, doc: Any):
        c = self.config
        reason = invalid_reason(doc)
        if reason:
            yield TaggedOutput("errors", error_record(doc, MINHASH_STAGE, reason))
        else:
            yield doc["id"], doc
            grams = mh.shingles(doc["text"], c.ngram, c.normalization, c.seed)
            if grams.size:  # a text without words has nothing to be similar with: it is kept
                yield from self._lsh(survivor_rank(doc), grams)

    def _lsh(self, node: tuple, grams: np.ndarray):
        c = self.config
        sig = mh.minhash_signature(grams, c.num_perm, c.seed)
        yield TaggedOutput("payload", (node, (grams if c.verify else sig).tobytes()))
        keys = mh.band_keys(sig, c.num_bands, c.rows_per_band)
        yield TaggedOutput("doc_bands", (keys, node))
        for key in keys:
            yield TaggedOutput("bands", (key, (node, node)))


def _star_edge(bucket: int, centre: tuple, node: tuple):
    """A bucket member's candidate edge to the bucket's best-ranked member (none for the centre)."""
    if node != centre:
        yield node, centre


def _similarity(verify: bool):
    measure = mh.jaccard if verify else mh.estimated_jaccard

    def sim(a: bytes, b: bytes) -> float:
        return measure(np.frombuffer(a, dtype=np.uint64), np.frombuffer(b, dtype=np.uint64))
    return sim


def _largest_group(grouped: dict[str, list]) -> int:
    return max((len(v) for v in grouped.values()), default=0)


class _Similarities(beam.DoFn):
    """(node, {"root", "direct", "max"}) -> the duplicate record of a non-root node. Its similarity
    is the verified one to the survivor when that pair was an edge, else the highest verified
    similarity among its own edges."""

    def __init__(self) -> None:
        self.group_size = Metrics.distribution(METRICS_NAMESPACE, GROUP_SIZE_METRIC)

    def process(self, element: tuple[Any, dict[str, list]]):
        node, grouped = element
        self.group_size.update(_largest_group(grouped))
        if grouped["root"]:
            (root,) = grouped["root"]
            sim = grouped["direct"][0] if grouped["direct"] else grouped["max"][0]
            yield node[1], duplicate_record(node[1], root[1], MINHASH_STAGE, sim)


class _SplitKept(beam.DoFn):
    def __init__(self) -> None:
        self.group_size = Metrics.distribution(METRICS_NAMESPACE, GROUP_SIZE_METRIC)

    def process(self, element: tuple[str, dict[str, list]]):
        doc_id, grouped = element
        self.group_size.update(_largest_group(grouped))
        docs, dups = grouped["doc"], grouped["dup"]
        if len(docs) > 1:
            for doc in docs:
                yield TaggedOutput("errors", error_record(
                    doc, MINHASH_STAGE, f"id {doc_id!r} appears {len(docs)} times in the input"))
        elif dups:
            yield TaggedOutput("duplicates", dups[0])
        else:
            yield docs[0]


class MinHashDedup(beam.PTransform):
    """Near-duplicate removal: LSH candidates -> verified edges -> connected components -> one
    survivor per component (the component's minimum survivor rank: best quality, then smallest id).

    Every band bucket is a star around its best-ranked member (the bucket minimum, by a lifted
    combiner in `StarAggregate`), so a bucket of n documents yields n - 1 candidate edges, never
    n^2/2, and each edge is verified against the star centre (a member similar to another member
    but not to the centre gets no edge from that bucket; it has `num_bands` buckets to meet it in).
    Both ends' payloads reach an edge through two `AttachValue` joins (by member, then by centre).
    Buckets, centres and component hubs with more than `hot_key_threshold` members are served by
    side inputs, so no worker ever holds more than that many members of one key.
    """

    def __init__(self, config: mh.MinHashConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, docs: beam.PCollection) -> dict[str, beam.PCollection]:
        c = self.config
        caught = mh.candidate_probability(c.threshold, c.num_bands, c.rows_per_band)
        if caught < 0.95:
            log.warning("LSH %d x %d finds only %.1f%% of pairs at the threshold %.2f; raise "
                        "num_bands or lower rows_per_band (see dataprep.dedup.minhash)",
                        c.num_bands, c.rows_per_band, 100 * caught, c.threshold)
        hot = c.hot_key_threshold
        sim = _similarity(c.verify)
        threshold = c.threshold

        prep = docs | "Prepare" >> beam.ParDo(_MinHashPrepare(c)).with_outputs(
            "errors", "payload", "bands", "doc_bands", main="docs")
        candidates = (prep.bands
                      | "BucketStars" >> StarAggregate(_star_edge, hot, rescan=prep.doc_bands)
                      | "DistinctCandidates" >> beam.Distinct())

        def verified_edge(centre: Any, member_payload: tuple, centre_payload: bytes):
            member, payload = member_payload
            s = sim(payload, centre_payload)
            if s >= threshold:
                yield (centre, member), s

        verified = (candidates
                    | "AttachMemberPayload" >> AttachValue(prep.payload, hot)
                    | "ByCentre" >> beam.MapTuple(lambda m, centre, p: (centre, (m, p)))
                    | "AttachCentrePayload" >> AttachValue(prep.payload, hot)
                    | "Verify" >> beam.FlatMapTuple(verified_edge))
        components = (verified
                      | "EdgeNodes" >> beam.Keys()
                      | "Components" >> ConnectedComponents(c.max_cc_rounds, hot))

        def direct(element: tuple[tuple, dict[str, list]]):
            (_, node), grouped = element
            if grouped["final"] and grouped["verified"]:
                yield node, grouped["verified"][0]

        direct_sim = ({"final": components | "FinalPairs" >> beam.Map(lambda e: (e, None)),
                       "verified": verified}
                      | "JoinDirect" >> beam.CoGroupByKey()
                      | "Direct" >> beam.FlatMap(direct))
        max_sim = (verified
                   | "EndSims" >> beam.FlatMapTuple(lambda e, s: [(e[0], s), (e[1], s)])
                   | "MaxSim" >> beam.CombinePerKey(max))
        dups = ({"root": components | "ByNode" >> beam.MapTuple(lambda root, n: (n, root)),
                 "direct": direct_sim, "max": max_sim}
                | "JoinSims" >> beam.CoGroupByKey()
                | "Records" >> beam.ParDo(_Similarities()))
        out = ({"doc": prep.docs, "dup": dups}
               | "JoinDocs" >> beam.CoGroupByKey()
               | "SplitKept" >> beam.ParDo(_SplitKept()).with_outputs(
                   "duplicates", "errors", main="kept"))
        errors = (prep.errors, out.errors) | "Errors" >> beam.Flatten()
        return {"kept": out.kept, "duplicates": out.duplicates, "errors": errors}


class _Decontam(beam.DoFn):
    def __init__(self, config: DecontamConfig) -> None:
        self.config = config
        self.matched = Metrics.counter(METRICS_NAMESPACE, f"decontamination_{config.mode}")

    def process(self, doc: Any, index):
        reason = invalid_reason(doc)
        if reason:
            yield TaggedOutput("errors", error_record(doc, DECONTAM_STAGE, reason))
        else:
            yield from self._match(doc, index)

    def _match(self, doc: dict, index):
        hit = contamination(document_ngrams(doc["text"], self.config), index)
        if hit is None:
            yield doc
        else:
            self.matched.inc()
            record = duplicate_record(doc["id"], hit[1], DECONTAM_STAGE, hit[0])
            if self.config.mode == "drop":
                yield TaggedOutput("duplicates", record)
            else:
                yield TaggedOutput("flagged", record)
                yield {**doc, "flags": [*doc.get("flags", []), DECONTAM_STAGE]}


class Decontaminate(beam.PTransform):
    """Drop (or keep with a flag) documents sharing a word n-gram with the eval files.

    `duplicate_of` is the first matching eval item as "path:line" and `similarity` the fraction of
    the document's n-grams found in the eval set. The eval index is built once, on a worker, and
    broadcast as a side input (eval sets are small next to a corpus).
    """

    def __init__(self, config: DecontamConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, docs: beam.PCollection) -> dict[str, beam.PCollection]:
        c = self.config
        index = (docs.pipeline
                 | "EvalFiles" >> beam.Create([tuple(c.eval_paths)])
                 | "EvalIndex" >> beam.Map(lambda p: build_eval_index(
                     list(p), c.ngram, c.normalization, list(c.fields))))
        out = docs | "Match" >> beam.ParDo(_Decontam(c), AsSingleton(index)).with_outputs(
            "duplicates", "flagged", "errors", main="kept")
        return {"kept": out.kept, "duplicates": out.duplicates, "flagged": out.flagged,
                "errors": out.errors}
