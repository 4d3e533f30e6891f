"""The dedup Beam composites on the local runner: planted near-duplicates, chains, exact survivors,
decontamination, connected components, determinism across workers, and a 10,000-document hot bucket."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import random
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter

from dataprep.dedup import (
    ConnectedComponents,
    DecontamConfig,
    Decontaminate,
    ExactDedup,
    ExactDedupConfig,
    MinHashConfig,
    MinHashDedup,
    jaccard,
    shingles,
)
from dataprep.dedup.joins import GROUP_SIZE_METRIC, HOT_KEYS_METRIC, METRICS_NAMESPACE
from jobs.beam_options import pipeline_options

VOCAB = ["".join(w) for w in itertools.islice(
    itertools.product("bdfgklmnprstvz", "aeiou", "bdfgklmnprstvz", "aeiou"), 3000)]
IN_PROCESS: list[str] = []
TWO_WORKERS = ["--direct_running_mode=multi_processing",
               "--direct_num_workers=2"]


def random_words(rng: np.random.Generator, n: int) -> list[str]:
    return [VOCAB[i] for i in rng.integers(0, len(VOCAB), size=n)]


def edit(rng: np.random.Generator, ws: list[str], k: int) -> list[str]:
    """`ws` with `k` words at distinct random positions replaced by random words."""
    out = list(ws)
    for pos in rng.choice(len(ws), size=k, replace=False):
        out[pos] = VOCAB[rng.integers(0, len(VOCAB))]
    return out


@functools.cache
def shingle_set(text: str) -> np.ndarray:
    return shingles(text, MINHASH.ngram, MINHASH.normalization, MINHASH.seed)


def similarity(a: str, b: str) -> float:
    """Exact Jaccard of two texts' shingles under the MinHash config the tests run."""
    return jaccard(shingle_set(a), shingle_set(b))


def planted_corpus(seed: int, pairs_high: int, pairs_low: int) -> list[dict]:
    """Pairs of 300-word texts: `pairs_high` lightly edited (Jaccard ~0.8-0.97), `pairs_low`
    heavily (~0.55-0.8)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(pairs_high + pairs_low):
        base = random_words(rng, 300)
        k = int(rng.integers(1, 7)) if i < pairs_high else int(rng.integers(8, 17))
        docs.append({"id": f"p{i:03d}a", "text": " ".join(base)})
        docs.append({"id": f"p{i:03d}b", "text": " ".join(edit(rng, base, k)),
                     "quality": float(rng.random())})
    return docs


def chain(seed: int) -> list[dict]:
    """A ~ B ~ C with A and C not similar; A has the best quality."""
    rng = np.random.default_rng(seed)
    a = random_words(rng, 300)
    b = list(a)
    b[0:300:60] = random_words(rng, 5)
    c = list(b)
    c[30:300:60] = random_words(rng, 5)
    return [{"id": "chain-c", "text": " ".join(c)}, {"id": "chain-b", "text": " ".join(b)},
            {"id": "chain-a", "text": " ".join(a), "quality": 1.0}]


def run(build, out_dir: Path, options: list[str]) -> tuple[dict[str, list], object]:
    """Run `build(pipeline) -> {name: PCollection}`, each written as JSON lines; read them back."""
    p = beam.Pipeline(options=pipeline_options(options))
    outputs = build(p)
    for name, pcoll in outputs.items():
        _ = (pcoll
             | f"Json{name}" >> beam.Map(lambda x: json.dumps(x, sort_keys=True))
             | f"Write{name}" >> beam.io.WriteToText(str(out_dir / name), file_name_suffix=".jsonl"))
    result = p.run()
    result.wait_until_finish()
    read = {}
    for name in outputs:
        lines = []
        for f in sorted(out_dir.glob(f"{name}-*.jsonl")):
            lines += f.read_text().splitlines()
        read[name] = [json.loads(line) for line in sorted(lines)]
    return read, result


def metric(result, name: str, kind: str):
    found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE)
                                   .with_name(name))[kind]
    return [r.committed for r in found]


# ---------------------------------------------------------------- one pipeline for most checks

MINHASH = MinHashConfig(max_cc_rounds=4)  # these graphs converge in 2; the default is 10
PLANTED = planted_corpus(seed=3, pairs_high=40, pairs_low=40)
CHAIN = chain(seed=4)
EXACT_DOCS = [
    {"id": "x1", "text": "Hello   World"},
    {"id": "x3", "text": "HELLO WORLD", "quality": 0.9},
    {"id": "x2", "text": "hello world", "quality": 0.9},
    {"id": "y2", "text": "Node.js streams"},
    {"id": "y1", "text": "node.js  streams"},
    {"id": "z1", "text": "Node.js streams!"},
    {"id": 7, "text": "an id that is not a string"},
]
PASSAGE = ("the committee reviewed every proposal submitted before the deadline and then "
           "published a short summary of its findings for the board")
DECONTAM_DOCS = [
    {"id": "d1", "text": "Background. " + PASSAGE + " Later the board met.", "flags": ["x"]},
    {"id": "d2", "text": "An unrelated document about rivers and mountains " * 3},
    {"id": "d3", "text": "The committee reviewed every proposal submitted before the deadline."},
    {"id": "d4", "text": PASSAGE.upper()},
]
rng_graph = random.Random(5)
PATH_NODES = rng_graph.sample(range(1000, 2000), 64)
GRAPH = ([(PATH_NODES[i], PATH_NODES[i + 1]) for i in range(63)]
         + [(rng_graph.randrange(200), rng_graph.randrange(200)) for _ in range(150)])
GRAPH = [(a, b) for a, b in GRAPH if a != b]


def build_main(p, eval_path: str) -> dict:
    corpus = p | "Corpus" >> beam.Create(PLANTED + CHAIN)
    near = corpus | "MinHash" >> MinHashDedup(MINHASH)
    estimated = corpus | "Unverified" >> MinHashDedup(
        dataclasses.replace(MINHASH, verify=False, max_cc_rounds=2))
    exact = p | "ExactDocs" >> beam.Create(EXACT_DOCS) | "Exact" >> ExactDedup(ExactDedupConfig())
    decontam_docs = p | "DecontamDocs" >> beam.Create(DECONTAM_DOCS)
    drop = decontam_docs | "Drop" >> Decontaminate(DecontamConfig([eval_path], mode="drop"))
    flag = decontam_docs | "Flag" >> Decontaminate(DecontamConfig([eval_path], mode="flag"))
    cc = p | "Graph" >> beam.Create(GRAPH) | "CC" >> ConnectedComponents(6, hot_key_threshold=4)
    return {"near_kept": near["kept"], "near_dups": near["duplicates"],
            "near_errors": near["errors"], "estimated_dups": estimated["duplicates"],
            "exact_kept": exact["kept"],
            "exact_dups": exact["duplicates"], "exact_errors": exact["errors"],
            "drop_kept": drop["kept"], "drop_dups": drop["duplicates"],
            "flag_kept": flag["kept"], "flag_flagged": flag["flagged"],
            "flag_dups": flag["duplicates"], "cc": cc}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory) -> dict[str, list]:
    root = tmp_path_factory.mktemp("dedup")
    eval_path = root / "eval.jsonl"
    eval_path.write_text(json.dumps({"question": "q", "context": PASSAGE}) + "\n")
    out, _ = run(lambda p: build_main(p, str(eval_path)), root, IN_PROCESS)
    out["eval_path"] = str(eval_path)
    return out


def survivors(duplicates: list[dict]) -> dict[str, str]:
    return {d["id"]: d["duplicate_of"] for d in duplicates}


def test_planted_near_duplicates_recall_and_precision(main_run) -> None:
    truth = {}
    for a, b in itertools.combinations(sorted(PLANTED, key=lambda d: d["id"]), 2):
        s = similarity(a["text"], b["text"])
        if s >= MINHASH.threshold:
            truth[(a["id"], b["id"])] = s
    levels = [similarity(PLANTED[i]["text"], PLANTED[i + 1]["text"])
              for i in range(0, len(PLANTED), 2)]
    assert sum(s >= 0.8 for s in levels) >= 30 and sum(0.55 <= s < 0.8 for s in levels) >= 30

    survivor = survivors(main_run["near_dups"])
    component = {i: survivor.get(i, i) for i in (d["id"] for d in PLANTED)}
    predicted = {(a, b) for a, b in itertools.combinations(sorted(component), 2)
                 if component[a] == component[b]}
    recall = len(predicted & truth.keys()) / len(truth)
    precision = len(predicted & truth.keys()) / len(predicted)
    assert recall >= 0.95 and precision >= 0.98, (recall, precision)
    for d in main_run["near_dups"]:
        if d["id"].startswith("p"):
            pair = tuple(sorted((d["id"], d["duplicate_of"])))
            assert d["similarity"] == pytest.approx(truth[pair])
            # the survivor of a pair is the better quality: the edited copy ("b") has one
            assert d["duplicate_of"].endswith("b") and d["stage"] == "minhash_dedup"
    kept_ids = {d["id"] for d in main_run["near_kept"]}
    assert len(kept_ids) + len(main_run["near_dups"]) == len(PLANTED) + len(CHAIN)
    assert not kept_ids & set(survivor) and main_run["near_errors"] == []


def test_without_verification_similarity_is_the_signature_estimate(main_run) -> None:
    verified = {d["id"]: d for d in main_run["near_dups"]}
    estimated = {d["id"]: d for d in main_run["estimated_dups"] if d["id"].startswith("p")}
    assert len(estimated.keys() & verified.keys()) >= 0.9 * len(estimated)
    errors = [abs(d["similarity"] - verified[i]["similarity"]) for i, d in estimated.items()
              if i in verified and d["duplicate_of"] == verified[i]["duplicate_of"]]
    assert errors and max(errors) < 0.1 and any(e > 0 for e in errors)  # an estimate, not exact
    assert all(d["similarity"] >= MINHASH.threshold for d in estimated.values())


def test_chain_is_one_component_with_one_survivor(main_run) -> None:
    a, b, c = (d["text"] for d in sorted(CHAIN, key=lambda d: d["id"]))
    s_ab, s_bc, s_ac = (similarity(x, y) for x, y in ((a, b), (b, c), (a, c)))
    assert s_ab >= 0.8 and s_bc >= 0.8 and s_ac < 0.8
    dups = {d["id"]: d for d in main_run["near_dups"] if d["id"].startswith("chain")}
    assert set(dups) == {"chain-b", "chain-c"}
    assert {d["duplicate_of"] for d in dups.values()} == {"chain-a"}
    assert dups["chain-b"]["similarity"] == pytest.approx(s_ab)  # verified directly
    assert dups["chain-c"]["similarity"] == pytest.approx(s_bc)  # best edge of its own
    assert "chain-a" in {d["id"] for d in main_run["near_kept"]}


def test_exact_dedup_keeps_best_quality_then_smallest_id(main_run) -> None:
    assert sorted(d["id"] for d in main_run["exact_kept"]) == ["x2", "y1", "z1"]
    assert survivors(main_run["exact_dups"]) == {"x1": "x2", "x3": "x2", "y2": "y1"}
    assert {(d["stage"], d["similarity"]) for d in main_run["exact_dups"]} == \
        {("exact_dedup", 1.0)}
    assert main_run["exact_kept"][0] == EXACT_DOCS[2]  # documents pass through unchanged
    assert [e["record"]["id"] for e in main_run["exact_errors"]] == [7]


def test_decontamination_drops_or_flags_and_counts(main_run) -> None:
    ref = main_run["eval_path"] + ":1"
    assert sorted(d["id"] for d in main_run["drop_kept"]) == ["d2", "d3"]
    assert {d["id"]: d["duplicate_of"] for d in main_run["drop_dups"]} == {"d1": ref, "d4": ref}
    assert {d["id"]: d["similarity"] for d in main_run["drop_dups"]}["d4"] == 1.0
    flagged = {d["id"]: d.get("flags") for d in main_run["flag_kept"]}
    assert flagged == {"d1": ["x", "decontamination"], "d2": None, "d3": None,
                       "d4": ["decontamination"]}
    assert len(main_run["flag_flagged"]) == 2 and main_run["flag_dups"] == []


def test_connected_components_match_union_find(main_run) -> None:
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in GRAPH:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    expected = sorted([find(n), n] for n in parent if find(n) != n)
    assert sorted(main_run["cc"]) == expected


def test_unconverged_components_fail_loudly(tmp_path) -> None:
    path = [(PATH_NODES[i], PATH_NODES[i + 1]) for i in range(63)]
    with pytest.raises(Exception, match="did not converge in 1 .*max_cc_rounds"):
        run(lambda p: {"cc": p | beam.Create(path) | ConnectedComponents(1, 1000)},
            tmp_path, IN_PROCESS)


@pytest.mark.slow
def test_results_identical_across_one_and_two_workers(main_run, tmp_path) -> None:
    eval_path = main_run["eval_path"]
    out, _ = run(lambda p: build_main(p, eval_path), tmp_path, TWO_WORKERS)
    for name, records in out.items():
        assert records == main_run[name], name


@pytest.mark.slow
def test_hot_bucket_of_10000_documents_is_never_grouped(tmp_path) -> None:
    rng = np.random.default_rng(6)
    boilerplate = random_words(rng, 60)
    docs = [{"id": f"h{i:05d}", "text": " ".join(boilerplate + [f"u{i}"])} for i in range(10_000)]
    docs[1234]["quality"] = 1.0
    docs += [{"id": f"o{i}", "text": " ".join(random_words(rng, 80))} for i in range(20)]
    config = MinHashConfig(num_bands=4, rows_per_band=8, hot_key_threshold=1000, max_cc_rounds=2)

    def build(p):
        corpus = p | beam.Create(docs)
        near = corpus | "MinHash" >> MinHashDedup(config)
        copies = p | "Copies" >> beam.Create([{"id": f"c{i:04d}", "text": "Accept cookies"}
                                               for i in range(2000)])
        exact = copies | "Exact" >> ExactDedup(ExactDedupConfig(hot_key_threshold=1000))
        return {"dups": near["duplicates"], "kept": near["kept"], "exact": exact["kept"]}

    out, result = run(build, tmp_path, IN_PROCESS)
    assert len(out["kept"]) == 21 and len(out["dups"]) == 9_999
    assert {d["duplicate_of"] for d in out["dups"]} == {"h01234"}
    assert [d["id"] for d in out["exact"]] == ["c0000"]
    # the proof: every group any dedup DoFn iterated held at most hot_key_threshold items, while
    # keys with up to 10,000 items (band buckets, the star centre, the component) went hot
    groups = metric(result, GROUP_SIZE_METRIC, "distributions")  # one per grouping step
    assert len(groups) >= 10 and 0 < max(g.max for g in groups) <= 1000
    assert sum(metric(result, HOT_KEYS_METRIC, "counters")) >= 3
