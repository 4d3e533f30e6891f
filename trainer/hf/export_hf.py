"""`kiln export-hf CKPT --out HF_DIR`: a checkpoint saved under any TP/PP layout -> a Hugging Face
directory (`*.safetensors` + index, `config.json`, `generation_config.json`, tokenizer with the
chat template) that `transformers` loads with no missing or unexpected weights.

CKPT is a checkpoint directory or a checkpoints root (its `latest`). The model section comes from
the run config stored in the checkpoint; the HF config, generation config and tokenizer come from
the imported model the run started from (followed through `init.checkpoint`), or `--tokenizer`;
a model trained from scratch takes the `kiln tokenizer` sentencepiece model its run names,
converted to a `tokenizer.json` that gives the same ids (`trainer/hf/sentencepiece_hf.py`).
Read one layer at a time from the torch DCP files, without torch.distributed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
import yaml

from kiln.config import from_dict
from kiln.errors import DataError, UsageError
from kiln.log import get_logger
from kiln.paths import atomic_dir
from kiln.progress import counter
from schemas.chat import (  # turn terminator: generation stops there too
    CHAT_TEMPLATE_JINJA,
    END_OF_TURN,
)
from trainer.config import ModelConfig
from trainer.hf import sentencepiece_hf
from trainer.hf.config_map import hf_from_model
from trainer.hf.dcp import CheckpointReader, load_common
from trainer.hf.import_hf import DTYPES, TOKENIZER_FILES, copy_files
from trainer.hf.mapping import Dims, params, stacked, to_hf

log = get_logger(__name__)



def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln export-hf", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory, or a checkpoints root with `latest`")
    p.add_argument("--out", required=True, help="Hugging Face directory to create")
    p.add_argument("--tokenizer", help="HF or `kiln tokenizer` directory (default: the imported "
                   "model's, else the run's sentencepiece tokenizer, converted)")
    p.add_argument("--dtype", choices=["checkpoint", *DTYPES], default="checkpoint",
                   help="dtype of the exported weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 500MB")
    p.add_argument("--chat-template", choices=["ours", "source", "none"], default="ours",
                   help="llmkiln's chat template (default), the tokenizer's own, or none")
    p.add_argument("--vocab-size", type=int,
                   help="unpadded vocabulary (default: model.vocab_size or the data's tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


def parse_size(text: str) -> int:
    # longest suffix first: "5GiB" is not "5Gi" of "B"
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    raise UsageError(f"--max-shard-size {text!r}: expected e.g. 500MB, 5GB or 4GiB")


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a checkpoints root (then the one its `latest` file names, the
    layout `trainer.checkpoint` writes; read here without importing megatron)."""
    marker = os.path.join(path, "latest")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            found = os.path.join(path, f.read().strip())
        if not os.path.exists(os.path.join(found, "metadata.json")):
            raise DataError(f"'latest' names {found}, which is not a checkpoint", path=path)
        return found
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise DataError("not a checkpoint (no metadata.json, no 'latest')", path=path)
    return path


def run_config(ckpt: str) -> dict[str, Any]:
    common = load_common(ckpt)
    text = common.get("config")
    if not isinstance(text, str):
        raise DataError("the checkpoint stores no run config ('config' in common.pt)", path=ckpt)
    return yaml.safe_load(text) or {}


def imported_origin(ckpt: str, cfg: dict[str, Any]) -> str | None:
    """The `kiln import-hf` directory this checkpoint descends from through `init.checkpoint`."""
    seen = set()
    while ckpt not in seen:
        seen.add(ckpt)
        if os.path.exists(os.path.join(ckpt, "import.json")):
            return ckpt
        init = (cfg.get("init") or {}).get("checkpoint")
        if not init or not os.path.exists(init):
            return None
        ckpt = resolve_checkpoint(init)
        cfg = run_config(ckpt)
    return None


def tokenizer_dir(checkpoint: str) -> str | None:
    """The tokenizer of the `kiln import-hf` model a checkpoint descends from, if any."""
    ckpt = resolve_checkpoint(os.path.abspath(checkpoint))
    origin = imported_origin(ckpt, run_config(ckpt))
    path = os.path.join(origin, "tokenizer") if origin else None
    return path if path and os.path.isdir(path) else None


def manifest_tokenizers(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The `tokenizer` record of each readable data manifest of a run: every contract keeps one
    (pretraining tokens, SFT, preference and prompt shards)."""
    from schemas.manifest import read_manifest

    found = []
    for path in (cfg.get("data") or {}).get("manifests") or []:
        try:
            found.append(read_manifest(path).tokenizer or {})
        except (OSError, ValueError):
            continue
    return found


def sentencepiece_dir(cfg: dict[str, Any]) -> str | None:
    """The `kiln tokenizer` directory a run trained with: its stage's `tokenizer` setting, else
    the one its data manifests record."""
    stage = cfg.get(cfg.get("stage") or "") or {}
    candidates = [stage.get("tokenizer") if isinstance(stage, dict) else None]
    candidates += [t.get("path") for t in manifest_tokenizers(cfg)]
    for path in candidates:
        if isinstance(path, str) and os.path.exists(os.path.join(path, "tokenizer.model")):
            return path
    return None


def unpadded_vocab(model: ModelConfig, cfg: dict[str, Any], override: int | None) -> int:
    if override is not None:
        return override
    if model.vocab_size is not None:
        return model.vocab_size
    for tokenizer in manifest_tokenizers(cfg):  # the tokenizer the run's data was made with
        vocab = tokenizer.get("vocab_size")
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    raise UsageError("the vocabulary size is not recorded (no model.vocab_size, and no readable "
                     "data manifest names one): pass --vocab-size")


def check_shapes(reader: CheckpointReader, d: Dims, ckpt: str) -> None:
    for p in params(d):
        want = stacked(p, d)
        got = reader.shape(p.key)
        if got is None:
            raise DataError("tensor missing from the checkpoint", path=ckpt, field=p.key)
        vocab_rows = p.key in ("embedding.word_embeddings.weight", "output_layer.weight")
        # Vocabulary rows may be padded (for TP); the rest must match the config exactly.
        if (got[1:] != want[1:] or got[0] < want[0]) if vocab_rows else got != want:
            raise DataError(f"shape {list(got)}, the run config implies {list(want)}", path=ckpt,
                            field=p.key)


def hf_tensors(reader: CheckpointReader, d: Dims,
               dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for the whole model, reading one layer at a time."""
    plist = params(d)
    flat = [p for p in plist if not p.layered]
    layered = [p for p in plist if p.layered]
    boxes = {p.key: ([0] * len(p.shape), p.shape) for p in flat}
    whole = reader.read(boxes, dtype)
    for p in flat:
        yield from zip(p.hf_names(None), to_hf(p, whole.pop(p.key), d), strict=True)
    with counter("export", total=d.layers) as progress:
        for layer in range(d.layers):
            got = reader.read({p.key: ((layer, *[0] * len(p.shape)), (1, *p.shape))
                               for p in layered}, dtype)
            for p in layered:
                yield from zip(p.hf_names(layer), to_hf(p, got.pop(p.key)[0], d), strict=True)
            progress.advance(1)


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out: str, max_bytes: int) -> int:
    """HF's layout: `model.safetensors`, or `model-0000i-of-0000N.safetensors` + index."""
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        save_file(pending, os.path.join(out, f".shard-{len(shards)}"), metadata={"format": "pt"})
        shards.append(list(pending))
        pending, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_bytes:
            flush()
        pending[name] = tensor
        weight_map[name] = len(shards)
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    names = (["model.safetensors"] if n == 1
             else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for i, name in enumerate(names):
        os.replace(os.path.join(out, f".shard-{i}"), os.path.join(out, name))
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
        with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return total


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def chat_template(choice: str) -> str | None:
    if choice != "ours":
        return None
    return CHAT_TEMPLATE_JINJA


def write_tokenizer(src: str, out: str, choice: str, vocab_size: int,
                    name: str | None = None) -> dict[str, int | None]:
    """Copy the tokenizer, set the chat template; the special ids generation needs. A tokenizer
    with more ids than the model's `vocab_size` is refused (its ids past it have no weights)."""
    from tokenizers import Tokenizer

    copied = copy_files(src, TOKENIZER_FILES, out)
    if "tokenizer.json" not in copied:
        raise DataError("no tokenizer.json", path=src)
    path = os.path.join(out, "tokenizer_config.json")
    config = read_json(path) or {}
    if choice != "source":
        config.pop("chat_template", None)
        if os.path.exists(os.path.join(out, "chat_template.jinja")):
            os.unlink(os.path.join(out, "chat_template.jinja"))
        template = chat_template(choice)
        if template is not None:
            config["chat_template"] = template
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    tk = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    if tk.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise UsageError(f"{name or src}: the tokenizer has {tk.get_vocab_size(with_added_tokens=True)} "
                         f"ids, the exported vocabulary {vocab_size} (--vocab-size, or what the "
                         "run recorded): not this model's tokenizer, or a vocabulary too small")

    def token_id(key: str) -> int | None:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return tk.token_to_id(text) if isinstance(text, str) else None

    ids = {k: token_id(f"{k}_token") for k in ("bos", "eos", "pad")}
    ids["end_of_turn"] = tk.token_to_id(END_OF_TURN) if choice == "ours" else None
    return ids


def generation_config(base: dict[str, Any] | None, ids: dict[str, int | None]) -> dict[str, Any]:
    gen = dict(base or {})
    for key in ("bos", "pad"):
        if ids[key] is not None:
            gen[f"{key}_token_id"] = ids[key]
    eos = [i for i in (ids["eos"], ids["end_of_turn"]) if i is not None]
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"--out {out} exists (pass --overwrite to replace it)")
    max_bytes = parse_size(args.max_shard_size)
    ckpt = resolve_checkpoint(os.path.abspath(args.checkpoint))
    cfg = run_config(ckpt)
    if cfg.get("stage") == "rm":
        raise UsageError(f"{ckpt} is a reward model (stage: rm): a scalar head, not a language "
                         "model to export as *ForCausalLM")
    model = from_dict(ModelConfig, cfg.get("model") or {}, "model")
    # the context it was trained on, where the config does not say (an import's config.json does)
    trained = (cfg.get("train") or {}).get("seq_length")
    if model.max_position_embeddings is None and trained:
        model = replace(model, max_position_embeddings=trained)
    origin = imported_origin(ckpt, cfg)
    tokenizer = args.tokenizer or (os.path.join(origin, "tokenizer") if origin else None)
    tokenizer = tokenizer or sentencepiece_dir(cfg)
    if tokenizer is None or not os.path.isdir(tokenizer):
        raise UsageError(f"{ckpt} does not descend from a `kiln import-hf` directory with a "
                         "tokenizer, and its run config names no `kiln tokenizer` directory: "
                         "pass --tokenizer DIR (Hugging Face, or `kiln tokenizer`)")
    vocab = args.vocab_size or load_common(ckpt).get("vocab_size") or unpadded_vocab(
        model, cfg, None)
    d = Dims.of(model, vocab)
    reader = CheckpointReader(ckpt)
    check_shapes(reader, d, ckpt)
    dtype = (reader.dtype("embedding.word_embeddings.weight") if args.dtype == "checkpoint"
             else DTYPES[args.dtype])
    imported = read_json(os.path.join(origin, "import.json")) if origin else None
    hf_dir = os.path.join(origin, "hf") if origin else ""
    config = hf_from_model(model, vocab, str(dtype).removeprefix("torch."),
                           base=read_json(os.path.join(hf_dir, "config.json")),
                           family=imported["family"] if imported else None)
    named = tokenizer  # a converted `kiln tokenizer` is written to a temporary directory
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory() as converted:
        spm_model = os.path.join(tokenizer, "tokenizer.model")
        if not os.path.exists(os.path.join(tokenizer, "tokenizer.json")) \
                and os.path.exists(spm_model):  # a `kiln tokenizer` directory
            sentencepiece_hf.write(spm_model, converted,
                                   (cfg.get("train") or {}).get("seq_length"))
            log.info("tokenizer: %s converted to tokenizer.json (the same ids)", spm_model)
            tokenizer = converted
        ids = write_tokenizer(tokenizer, tmp, args.chat_template, vocab, name=named)
        total = write_safetensors(hf_tensors(reader, d, dtype), tmp, max_bytes)
        for key in ("bos", "eos", "pad"):
            if ids[key] is not None:
                config[f"{key}_token_id"] = ids[key]
        gen = generation_config(read_json(os.path.join(hf_dir, "generation_config.json")), ids)
        for name, doc in (("config.json", config), ("generation_config.json", gen)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
    log.info("exported %s (%s, %.1f MB of weights) to %s", ckpt, config["architectures"][0],
             total / 1e6, out)
    print(out)
    return 0


if __name__ == "__main__":
    import sys

    from kiln.cli import entry

    sys.exit(entry(main))

