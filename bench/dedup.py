"""MinHash dedup benchmark on real text (Node.js docs sections, HH-RLHF dialogues) with planted
near-duplicates (word replacements until the pair's Jaccard, measured on the real shingles, lands in
0.5-0.6 ... 0.9-1.0): the share of planted pairs found per Jaccard band, recall and precision
against exact all-pairs Jaccard, next to datasketch's MinHashLSH (same threshold and num_perm) and
datatrove's four-stage MinHash pipeline (at 84 x 15 and at its default 14 x 8); throughput in
documents per CPU-second against datatrove; our CPU time at N and 4N documents.

    python bench/dedup.py [--n 2000] [--pairs-per-band 60]

Both pipelines run on one core (Beam's in-process FnApiRunner, datatrove's LocalPipelineExecutor
with one worker); throughput is documents per CPU-second of this process, so other load on the
machine does not count. Last line: one JSON object; `ratio` = our throughput / datatrove's at the
same bands x rows (84 x 15), `goal` 1.0.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import tarfile
import tempfile
import time
from html.parser import HTMLParser

import numpy as np
from scipy import sparse

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root in place of bench/, whose tokenize.py would shadow the stdlib module

import apache_beam as beam  # noqa: E402

from dataprep.dedup import MinHashConfig, MinHashDedup, shingles  # noqa: E402
from jobs.beam_options import pipeline_options  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "sample_data")
BANDS = [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0)]
CONFIG = MinHashConfig()


class _Paragraphs(HTMLParser):
    """Text of <p> and <li> elements, code blocks skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._current: list[str] | None = None
        self._code = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("p", "li"):
            self._current = []
        elif tag in ("pre", "code", "script", "style"):
            self._code += 1

    def handle_endtag(self, tag):
        if tag in ("pre", "code", "script", "style"):
            self._code = max(0, self._code - 1)
        elif tag in ("p", "li") and self._current is not None:
            text = " ".join("".join(self._current).split())
            if text:
                self.paragraphs.append(text)
            self._current = None

    def handle_data(self, data):
        if self._current is not None and not self._code:
            self._current.append(data)


def real_texts() -> list[str]:
    """Node.js doc sections (consecutive paragraphs up to >= 120 words) and HH-RLHF dialogues."""
    texts = []
    with tarfile.open(f"{DATA}/nodejs-api-html.tar.gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.name.endswith(".html"):
                continue
            parser = _Paragraphs()
            parser.feed(tar.extractfile(member).read().decode("utf-8", "replace"))
            section: list[str] = []
            for paragraph in parser.paragraphs:
                section.append(paragraph)
                if sum(len(p.split()) for p in section) >= 120:
                    texts.append(" ".join(section))
                    section = []
    with gzip.open(f"{DATA}/hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f:
        texts += [t for t in (json.loads(line)["chosen"] for line in f) if len(t.split()) >= 80]
    return texts


def shingle_set(text: str) -> np.ndarray:
    return shingles(text, CONFIG.ngram, CONFIG.normalization, CONFIG.seed)


def plant(rng: np.random.Generator, text: str, band: tuple[float, float], vocab: list[str]):
    """A copy of `text` with random word replacements whose Jaccard to `text` lies in `band`."""
    base = shingle_set(text)
    for _ in range(8):
        words = text.split()
        order = rng.permutation(len(words))
        for pos in order:
            words[pos] = vocab[rng.integers(len(vocab))]
            edited = shingle_set(" ".join(words))
            inter = np.intersect1d(base, edited, assume_unique=True).size
            s = inter / (base.size + edited.size - inter)
            if s < band[1] or (band[1] == 1.0 and s < 1.0):
                if s >= band[0]:
                    return " ".join(words), s
                break
    return None


def corpus(texts: list[str], n: int, rng: np.random.Generator):
    """`n` documents: 3/4 distinct real texts (ids `t`), 1/4 planted copies (ids `v`) of distinct
    base texts, cycling through the Jaccard bands; also the planted (base, copy, Jaccard)."""
    vocab = sorted({w for t in texts[:500] for w in t.split()})
    n_base = 3 * n // 4
    if n_base > len(texts):
        raise SystemExit(f"--n {n} needs {n_base} base texts, only {len(texts)} exist")
    order = rng.permutation(len(texts))[:n_base]
    docs = [{"id": f"t{i:05d}", "text": texts[j]} for i, j in enumerate(order)]
    planted = []
    bases = iter(rng.permutation(n_base))
    while len(docs) < n:
        band = BANDS[(len(docs) - n_base) % len(BANDS)]
        base = int(next(bases))
        made = plant(rng, docs[base]["text"], band, vocab)
        if made:
            planted.append((base, len(docs), made[1]))
            docs.append({"id": f"v{len(docs) - n_base:05d}", "text": made[0]})
    return docs, planted


def all_pairs(docs: list[dict]) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair sharing a shingle (sparse incidence product)."""
    sets = [shingle_set(d["text"]) for d in docs]
    cols = np.concatenate(sets)
    _, col_idx = np.unique(cols, return_inverse=True)
    rows = np.repeat(np.arange(len(sets)), [s.size for s in sets])
    x = sparse.csr_matrix((np.ones(rows.size, np.int32), (rows, col_idx)))
    inter = sparse.triu(x @ x.T, k=1).tocoo()
    sizes = np.array([s.size for s in sets])
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    keep = jac >= BANDS[0][0] - 1e-12
    return {(int(a), int(b)): float(j) for a, b, j in
            zip(inter.row[keep], inter.col[keep], jac[keep], strict=True)}


def in_band(s: float, band: tuple[float, float]) -> bool:
    return band[0] <= s < band[1] or (band[1] == 1.0 and s == 1.0)


def quality(clusters: list[list[int]], truth: dict[tuple[int, int], float],
            planted: list[tuple[int, int, float]]) -> dict:
    """found_<band>: share of the planted pairs of that true-Jaccard band put in one cluster (for
    bands >= 0.8 the recall, below it the rate of merges that should not happen directly);
    recall: share of all pairs with true Jaccard >= 0.8 put in one cluster; precision: share of
    the documents in multi-document clusters that have a true >= 0.8 near-duplicate in their
    cluster (a cluster member without one was merged on a false positive)."""
    cluster_of = {i: k for k, members in enumerate(clusters) for i in members}
    same = lambda a, b: a in cluster_of and cluster_of.get(a) == cluster_of.get(b)  # noqa: E731
    out = {}
    for band in BANDS:
        pairs = [(a, b) for a, b, s in planted if in_band(s, band)]
        out[f"found_{band[0]:.1f}-{band[1]:.1f}"] = round(
            sum(same(a, b) for a, b in pairs) / max(1, len(pairs)), 4)
    positives = [p for p, s in truth.items() if s >= CONFIG.threshold]
    out["recall"] = round(sum(same(a, b) for a, b in positives) / max(1, len(positives)), 4)
    justified = set()
    for a, b in positives:
        if same(a, b):
            justified.update((a, b))
    members = sum(len(m) for m in clusters)
    out["precision"] = round(len(justified) / max(1, members), 4)
    return out


def clusters_from(ids: list[str], survivor_of: dict[str, str]) -> list[list[int]]:
    index = {d: i for i, d in enumerate(ids)}
    groups: dict[str, list[int]] = {}
    for doc, survivor in survivor_of.items():
        groups.setdefault(survivor, [index[survivor]]).append(index[doc])
    return list(groups.values())


def run_ours(docs: list[dict], workdir: str) -> tuple[dict[str, str], float, float]:
    """Our MinHashDedup on the in-process FnApiRunner, reading JSON lines as datatrove does:
    (id -> survivor, CPU s, wall s)."""
    source = os.path.join(workdir, f"input-{len(docs)}.jsonl")
    with open(source, "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    out = os.path.join(workdir, "ours")
    for stale in glob.glob(out + "*"):
        os.remove(stale)
    cpu, wall = time.process_time(), time.perf_counter()
    with beam.Pipeline(options=pipeline_options([])) as p:
        result = (p | beam.io.ReadFromText(source) | beam.Map(json.loads)
                  | MinHashDedup(CONFIG))
        _ = (result["duplicates"] | beam.Map(json.dumps)
             | beam.io.WriteToText(out, file_name_suffix=".jsonl"))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    survivor = {}
    for path in glob.glob(out + "*.jsonl"):
        for line in open(path):
            d = json.loads(line)
            survivor[d["id"]] = d["duplicate_of"]
    return survivor, cpu, wall


def run_datasketch(docs: list[dict]) -> tuple[list[list[int]], tuple[int, int], float]:
    """datasketch MinHashLSH, same shingles/threshold/num_perm: clusters by union-find of
    candidates (datasketch has no verification step)."""
    from datasketch import MinHash, MinHashLSH

    cpu = time.process_time()
    lsh = MinHashLSH(threshold=CONFIG.threshold, num_perm=CONFIG.num_perm)
    sigs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=CONFIG.num_perm, seed=CONFIG.seed)
        m.update_batch([int(x).to_bytes(8, "little") for x in shingle_set(d["text"])])
        lsh.insert(i, m)
        sigs.append(m)
    parent = list(range(len(docs)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(len(docs)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1], (lsh.b, lsh.r), time.process_time() - cpu


def run_datatrove(docs: list[dict], workdir: str, bands: int, rows: int):
    """datatrove's four MinHash stages with LocalPipelineExecutor (1 worker): (clusters, CPU s,
    wall s)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    d = tempfile.mkdtemp(dir=workdir, prefix=f"datatrove{bands}x{rows}-")
    os.makedirs(f"{d}/in")
    with open(f"{d}/in/docs.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    config = MinhashConfig(n_grams=CONFIG.ngram, num_buckets=bands, hashes_per_bucket=rows,
                           seed=CONFIG.seed)
    stages = [
        ([JsonlReader(f"{d}/in"), MinhashDedupSignature(f"{d}/sig", config=config)], 1),
        ([MinhashDedupBuckets(f"{d}/sig", f"{d}/buckets", config=config)], bands),
        ([MinhashDedupCluster(f"{d}/buckets", f"{d}/remove", config=config,
                              save_cluster_id=True)], 1),
        ([JsonlReader(f"{d}/in"),
          MinhashDedupFilter(f"{d}/remove", exclusion_writer=JsonlWriter(
              f"{d}/removed", compression=None), load_cluster_ids=True),
          JsonlWriter(f"{d}/kept", compression=None)], 1),
    ]
    cpu, wall = time.process_time(), time.perf_counter()
    for i, (steps, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=steps, tasks=tasks, workers=1,
                              logging_dir=f"{d}/logs/{i}").run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    index = {doc["id"]: i for i, doc in enumerate(docs)}
    groups: dict[int, list[int]] = {}
    for path in glob.glob(f"{d}/removed/*.jsonl") + glob.glob(f"{d}/kept/*.jsonl"):
        for line in open(path):
            row = json.loads(line)
            cluster = row.get("metadata", {}).get("minhash_cluster_id", -1)
            if cluster != -1:
                groups.setdefault(cluster, []).append(index[row["id"]])
    return [g for g in groups.values() if len(g) > 1], cpu, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="N; scaling runs N and 4N documents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import logging
    logging.getLogger().setLevel(logging.WARNING)
    from loguru import logger
    logger.remove()

    texts = real_texts()
    rng = np.random.default_rng(args.seed)
    small, _ = corpus(texts, args.n, rng)
    large, planted = corpus(texts, 4 * args.n, np.random.default_rng(args.seed + 1))
    truth = all_pairs(large)
    ids = [d["id"] for d in large]
    print(f"corpus: {len(texts)} real texts; N={len(small)}, 4N={len(large)} documents; "
          "4N pairs by true Jaccard band, planted / all: " + ", ".join(
              f"{b[0]:.1f}-{b[1]:.1f}: {sum(in_band(s, b) for *_, s in planted)} / "
              f"{sum(in_band(s, b) for s in truth.values())}" for b in BANDS))
    c = CONFIG
    print(f"LSH {c.num_bands} bands x {c.rows_per_band} rows, threshold {c.threshold}, "
          f"{c.ngram}-word shingles, verify={c.verify}")

    with tempfile.TemporaryDirectory() as work:
        _, cpu_small, wall_small = run_ours(small, work)
        survivor, cpu_large, wall_large = run_ours(large, work)
        ours = quality(clusters_from(ids, survivor), truth, planted)
        ds_clusters, ds_params, ds_cpu = run_datasketch(large)
        datasketch = quality(ds_clusters, truth, planted)
        dt_clusters, dt_cpu, dt_wall = run_datatrove(large, work, c.num_bands, c.rows_per_band)
        datatrove = quality(dt_clusters, truth, planted)
        dt14_clusters, dt14_cpu, dt14_wall = run_datatrove(large, work, 14, 8)
        datatrove14 = quality(dt14_clusters, truth, planted)

    rows = [("ours (verified)", ours), (f"datasketch MinHashLSH b={ds_params[0]} r={ds_params[1]}",
                                        datasketch),
            (f"datatrove {c.num_bands}x{c.rows_per_band}", datatrove),
            ("datatrove 14x8 (its default)", datatrove14)]
    keys = list(ours)
    print(f"{'quality on 4N (see quality())':<44}"
          + "".join(f"{k:>15}" for k in keys))
    for name, q in rows:
        print(f"{name:<44}" + "".join(f"{q[k]:>15}" for k in keys))

    n4 = len(large)
    ours_tp, dt_tp, dt14_tp = n4 / cpu_large, n4 / dt_cpu, n4 / dt14_cpu
    scaling = cpu_large / cpu_small
    print(f"throughput on 4N (docs per CPU-second, one core): ours {ours_tp:.1f} "
          f"(wall {wall_large:.1f} s), datatrove {c.num_bands}x{c.rows_per_band} {dt_tp:.1f} "
          f"(wall {dt_wall:.1f} s), datatrove 14x8 {dt14_tp:.1f} (wall {dt14_wall:.1f} s); "
          f"datasketch (LSH only, no I/O) {n4 / ds_cpu:.1f}")
    print(f"scaling: ours N={len(small)} {cpu_small:.1f} CPU-s, 4N={n4} {cpu_large:.1f} CPU-s: "
          f"{scaling:.2f}x (goal <= 4.5)")
    print(json.dumps({
        "n": len(small), "n4": n4, "ours": ours, "datasketch": datasketch,
        f"datatrove_{c.num_bands}x{c.rows_per_band}": datatrove, "datatrove_14x8": datatrove14,
        "ours_docs_per_cpu_s": round(ours_tp, 2), "datatrove_docs_per_cpu_s": round(dt_tp, 2),
        "datatrove_14x8_docs_per_cpu_s": round(dt14_tp, 2),
        "ratio_vs_datatrove_14x8": round(ours_tp / dt14_tp, 3),
        "scaling_4n_over_n": round(scaling, 3), "scaling_goal": 4.5,
        "ratio": round(ours_tp / dt_tp, 3), "goal": 1.0,
    }))


if __name__ == "__main__":
    main()
