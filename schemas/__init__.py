"""The data contracts shared by `dataprep`/`jobs` and `trainer`: Arrow and Parquet schemas with
versions, Megatron's `.bin/.idx` layout, `manifest.json` with its ledger, dead-letter entries, and
`validate`. Depends on pyarrow and numpy only.

- `schemas.contracts`: `CONTRACTS`, `contract(name)`, `arrow_schema(name, fingerprint)`.
- `schemas.shards`: `write_arrow_shard`, `read_arrow_shard` (memory-mapped), `write_parquet_shard`.
- `schemas.indexed`: `IndexedWriter`, `read_index`, `IndexedReader`: megatron's MMIDIDX files.
- `schemas.manifest`: `Manifest`, `ShardEntry`, `Ledger`, `LedgerStage`, `write_manifest`, `read_manifest`.
- `schemas.deadletter`: `DeadLetter` entries and the JSONL writer.
- `schemas.validate`: `validate_path(path) -> Report`, and the `kiln validate` CLI.
"""
