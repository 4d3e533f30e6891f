"""`kiln import-hf HF_DIR --out CKPT [--tp N --pp M]`: a Hugging Face Llama/Mistral/Qwen2 directory
-> a megatron distributed checkpoint the trainer starts from (`init.checkpoint: CKPT`).

CKPT holds the checkpoint itself (`.metadata`, `__0_0.distcp`, `common.pt`, `metadata.json`),
`model.yaml` (a run config with the matching `model:` section, `parallel:` and `init.checkpoint`),
`tokenizer/` (the HF tokenizer files), `hf/` (the source `config.json` and
`generation_config.json`, for export) and `import.json` (source, family, tokenizer fingerprint,
warnings). Tensors stream from safetensors one at a time; CKPT appears only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import torch

from kiln.config import dump_yaml
from kiln.errors import DataError, UsageError
from kiln.log import get_logger
from kiln.paths import atomic_dir
from kiln.progress import counter
from trainer.config import DataConfig, InitConfig, ParallelConfig
from trainer.hf.config_map import HFModel, model_from_hf
from trainer.hf.dcp import CheckpointWriter
from trainer.hf.mapping import (
    EXTRA_STATE_MODULES,
    Dims,
    extra_state_key,
    hf_shapes,
    params,
    stacked,
    to_megatron,
)

log = get_logger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")
HF_META_FILES = ("config.json", "generation_config.json")
# Tensors HF checkpoints may carry that are not parameters (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln import-hf", description=__doc__.splitlines()[0])
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to record and check")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to record and check")
    p.add_argument("--dtype", choices=["source", *DTYPES], default="source",
                   help="dtype of the stored weights (default: as in the safetensors files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p.parse_args(argv)


class SafetensorsSource:
    """The tensors of an HF directory: one `model.safetensors` or shards with an index."""

    def __init__(self, directory: str, stack: ExitStack) -> None:
        from safetensors import safe_open

        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as exc:
                raise DataError(f"unreadable index: {exc}", path=index) from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            raise DataError("no model.safetensors or model.safetensors.index.json (only "
                            "safetensors weights are read)", path=directory)
        self.where: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        for name in files:
            path = os.path.join(directory, name)
            try:
                handle = stack.enter_context(safe_open(path, framework="pt"))
            except Exception as exc:  # safetensors raises its own error types
                raise DataError(f"not a readable safetensors file: {exc}", path=path) from None
            self._handles[path] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self.where[key] = path

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


def check_tensors(src: SafetensorsSource, d: Dims) -> None:
    """Every expected tensor present with its shape, nothing unexplained left over."""
    expected: set[str] = set()
    for p in params(d):
        for layer in range(d.layers) if p.layered else [None]:
            for name, shape in zip(p.hf_names(layer), hf_shapes(p, d), strict=True):
                expected.add(name)
                if name not in src.where:
                    raise DataError("tensor missing from the safetensors files", field=name)
                if src.shape(name) != shape:
                    raise DataError(f"shape {list(src.shape(name))}, config.json implies "
                                    f"{list(shape)}", path=src.where[name], field=name)
    leftover = sorted(n for n in src.where if n not in expected
                      and not n.endswith(IGNORED_SUFFIXES) and not (d.tied and n == "lm_head.weight"))
    if leftover:
        raise DataError(f"{len(leftover)} tensor(s) this architecture does not have, e.g. "
                        f"{leftover[0]}", path=src.where[leftover[0]], field=leftover[0])


def check_layout(m: HFModel, tp: int, pp: int) -> None:
    cfg = m.model
    for value, what in ((cfg.num_attention_heads, "num_attention_heads"),
                        (cfg.num_query_groups, "num_key_value_heads")):
        if value % tp:
            raise UsageError(f"--tp {tp}: {what}={value} is not divisible by it")
    if cfg.num_layers % pp:
        raise UsageError(f"--pp {pp}: num_hidden_layers={cfg.num_layers} is not divisible by it")


def check_tokenizer(directory: str, vocab_size: int) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise DataError(f"unreadable tokenizer: {exc}", path=path) from None
    if size > vocab_size:
        raise DataError(f"{size} tokens but the model has {vocab_size} embedding rows", path=path,
                        field="vocab_size")


def tokenizer_fingerprint(directory: str) -> str | None:
    """sha256 of `tokenizer.json`, as `dataprep.hf_tokenizer.HFTokenizer` computes it."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_weights(src: SafetensorsSource, d: Dims, out: str, dtype: torch.dtype | None,
                  common: dict[str, Any]) -> int:
    """Stream every tensor into the checkpoint; returns the number of parameters written."""
    total = 0
    plist = params(d)
    steps = sum(d.layers if p.layered else 1 for p in plist)
    with CheckpointWriter(out) as writer, counter("import", total=steps) as progress:
        for p in plist:
            for layer in range(d.layers) if p.layered else [None]:
                tensor = to_megatron(p, [src.get(n) for n in p.hf_names(layer)], d)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                if p.layered:
                    writer.add_tensor(p.key, stacked(p, d), (layer, *[0] * len(p.shape)),
                                      tensor.unsqueeze(0))
                else:
                    writer.add_tensor(p.key, p.shape, [0] * len(p.shape), tensor)
                total += tensor.numel()
                del tensor
                progress.advance(1)
        for layer in range(d.layers):
            for module in EXTRA_STATE_MODULES:
                writer.add_object(extra_state_key(module, layer, d.layers), None)
        writer.close(common)
    return total


def copy_files(src_dir: str, names: Sequence[str], dst_dir: str) -> list[str]:
    copied = [n for n in names if os.path.exists(os.path.join(src_dir, n))]
    if copied:
        os.makedirs(dst_dir, exist_ok=True)
    for name in copied:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return copied


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    hf_dir, out = os.path.abspath(args.hf_dir), os.path.abspath(args.out)
    if args.tp < 1 or args.pp < 1:
        raise UsageError("--tp and --pp must be >= 1")
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"--out {out} exists (pass --overwrite to replace it)")
    config_path = os.path.join(hf_dir, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except FileNotFoundError:
        raise DataError("no config.json: not a Hugging Face model directory", path=hf_dir) from None
    except ValueError as exc:
        raise DataError(f"not valid JSON: {exc}", path=config_path) from None
    m = model_from_hf(hf_config, config_path)
    check_layout(m, args.tp, args.pp)
    for warning in m.warnings:
        log.warning("%s: %s", config_path, warning)
    d = Dims.of(m.model, m.vocab_size)
    dtype = None if args.dtype == "source" else DTYPES[args.dtype]
    # The sections a run needs to start from these weights; everything else keeps its defaults.
    # No layout-independent init: it would draw every full tensor only to be overwritten.
    run = {"model": replace(m.model, layout_independent_init=False),
           "parallel": ParallelConfig(tp=args.tp, pp=args.pp),
           "init": InitConfig(checkpoint=out)}
    check_tokenizer(hf_dir, m.vocab_size)
    fingerprint = tokenizer_fingerprint(hf_dir)
    if fingerprint is not None:  # every stage then refuses data made with another tokenizer
        run["data"] = DataConfig(tokenizer_fingerprint=fingerprint)
    with ExitStack() as stack:
        src = SafetensorsSource(hf_dir, stack)
        check_tensors(src, d)
        with atomic_dir(out) as tmp:
            model_yaml = (f"# kiln import-hf {hf_dir} ({m.architecture}). Train from these weights:\n"
                          f"#   torchrun trainer/main.py --config {out}/model.yaml "
                          "--set stage=<stage> run_dir=<dir> <data keys>\n" + dump_yaml(run))
            n = write_weights(src, d, tmp, dtype, {"config": dump_yaml(run)})
            with open(os.path.join(tmp, "model.yaml"), "w", encoding="utf-8") as f:
                f.write(model_yaml)
            tokenizer = copy_files(hf_dir, TOKENIZER_FILES, os.path.join(tmp, "tokenizer"))
            copy_files(hf_dir, HF_META_FILES, os.path.join(tmp, "hf"))
            record = {"source": hf_dir, "architecture": m.architecture, "family": m.family,
                      "parameters": n, "tokenizer_files": tokenizer,
                      "tokenizer_fingerprint": fingerprint, "warnings": m.warnings,
                      "suggested_layout": {"tp": args.tp, "pp": args.pp}}
            with open(os.path.join(tmp, "import.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
    if not tokenizer:
        log.warning("%s has no tokenizer files: export-hf will need --tokenizer", hf_dir)
    log.info("imported %s (%s, %.1fM parameters) into %s", hf_dir, m.architecture, n / 1e6, out)
    print(out)
    return 0


if __name__ == "__main__":
    import sys

    from kiln.cli import entry

    sys.exit(entry(main))
