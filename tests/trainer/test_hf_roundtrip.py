"""`kiln import-hf` then `kiln export-hf`: bit-identical tensors, loadable by transformers; clear
errors for what cannot be converted, and nothing left behind when a conversion fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.cli import run_main
from kiln.config import read_yaml
from tests.trainer.hf_util import make_model, safetensors_dir
from trainer.hf import export_hf, import_hf
from trainer.hf.dcp import CheckpointWriter

CASES = {  # name -> (family, dtype, max_shard_size)
    "llama": ("llama", torch.float32, None),
    "mistral": ("mistral", torch.float32, None),
    "qwen2": ("qwen2", torch.float32, None),
    "llama_bf16_sharded": ("llama", torch.bfloat16, "40KB"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    for name, (family, dtype, shard) in CASES.items():
        make_model(family, root / name, dtype=dtype, max_shard_size=shard)
    return root


def cli(main, *argv: str) -> int:
    return run_main(main, [str(a) for a in argv])


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("name", list(CASES))
def test_import_then_export_is_bit_identical(models: Path, tmp_path: Path, name: str) -> None:
    src = models / name
    assert cli(import_hf.main, src, "--out", tmp_path / "ckpt") == 0
    assert cli(export_hf.main, tmp_path / "ckpt", "--out", tmp_path / "hf",
               "--chat-template", "source", "--max-shard-size", "40KB") == 0
    original, exported = safetensors_dir(src), safetensors_dir(tmp_path / "hf")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # 40KB forces shards
    src_cfg = json.loads((src / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("architectures", "model_type", "hidden_size", "num_key_value_heads", "vocab_size",
                "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "max_position_embeddings"):
        assert out_cfg[key] == src_cfg[key], key
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode("the cat")


def test_import_records_config_tokenizer_and_layout(models: Path, tmp_path: Path) -> None:
    assert cli(import_hf.main, models / "qwen2", "--out", tmp_path / "ckpt", "--tp", "2",
               "--pp", "2") == 0
    ckpt = tmp_path / "ckpt"
    run = read_yaml(ckpt / "model.yaml")
    assert run["parallel"]["tp"] == 2 and run["parallel"]["pp"] == 2
    assert run["init"]["checkpoint"] == str(ckpt)
    assert run["model"]["qkv_bias"] and run["model"]["tie_embeddings"]
    assert run["model"]["vocab_size"] == 300 and run["model"]["num_query_groups"] == 2
    from trainer.config import load_run_config

    cfg = load_run_config(str(ckpt / "model.yaml"), ["stage=pretrain"])  # the trainer accepts it
    assert cfg.model.rotary_base == 1000000
    record = json.loads((ckpt / "import.json").read_text())
    from dataprep.hf_tokenizer import HFTokenizer  # what the data jobs record for --tokenizer DIR

    assert record["tokenizer_fingerprint"] == HFTokenizer.load(str(models / "qwen2")).fingerprint
    # every stage started from model.yaml refuses data made with another tokenizer
    assert cfg.data.tokenizer_fingerprint == record["tokenizer_fingerprint"]
    assert (ckpt / "tokenizer" / "tokenizer.json").read_bytes() == \
        (models / "qwen2" / "tokenizer.json").read_bytes()
    assert (ckpt / "hf" / "config.json").exists() and (ckpt / "metadata.json").exists()


def test_llama_with_tokenizer_exports_our_chat_template(models: Path, tmp_path: Path) -> None:
    from schemas.chat import CHAT_TEMPLATE_JINJA as template
    assert cli(import_hf.main, models / "llama", "--out", tmp_path / "ckpt") == 0
    assert cli(export_hf.main, tmp_path / "ckpt", "--out", tmp_path / "hf") == 0
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|user|>hi<|end|><|assistant|>"
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [3, tok.convert_tokens_to_ids("<|end|>")]


def broken(models: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny Llama with its tensors edited by `edit(dict)`."""
    out = tmp_path / "broken"
    out.mkdir()
    for f in (models / "llama").iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(models / "llama" / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(95, 64)}),
     "model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"), "model.layers.0.self_attn.k_proj"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}),
     "model.layers.2.mlp.up_proj.weight"),
])
def test_tensor_mismatches_are_named_and_nothing_is_written(models: Path, tmp_path: Path, edit,
                                                           message: str, capsys) -> None:
    src = broken(models, tmp_path, edit)
    assert cli(import_hf.main, src, "--out", tmp_path / "ckpt") == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not leftovers(tmp_path)


def test_unsupported_architecture_exits_1(models: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                 "model_type": "gpt2"}))
    assert cli(import_hf.main, src, "--out", tmp_path / "ckpt") == 1
    assert "GPT2LMHeadModel" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()


def test_bad_arguments_exit_2(models: Path, tmp_path: Path, capsys) -> None:
    assert cli(import_hf.main, models / "llama", "--out", tmp_path / "ckpt", "--tp", "3") == 2
    assert "num_attention_heads=4" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli(import_hf.main, models / "llama", "--out", tmp_path / "exists") == 2
    assert cli(export_hf.main, models / "llama", "--out", tmp_path / "hf") == 1  # not a checkpoint


def test_a_failure_while_writing_leaves_no_checkpoint(models: Path, tmp_path: Path,
                                                      monkeypatch) -> None:
    calls = []

    def fail_on_fifth(self, *args):
        calls.append(args[0])
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, *args)

    original = CheckpointWriter.add_tensor
    monkeypatch.setattr(CheckpointWriter, "add_tensor", fail_on_fifth)
    with pytest.raises(OSError):
        cli(import_hf.main, models / "llama", "--out", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not leftovers(tmp_path)


def test_export_without_a_tokenizer_asks_for_one(models: Path, tmp_path: Path, capsys) -> None:
    assert cli(import_hf.main, models / "mistral", "--out", tmp_path / "ckpt") == 0
    for f in (tmp_path / "ckpt" / "tokenizer").iterdir():
        f.unlink()
    (tmp_path / "ckpt" / "tokenizer").rmdir()
    assert cli(export_hf.main, tmp_path / "ckpt", "--out", tmp_path / "hf") == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert cli(export_hf.main, tmp_path / "ckpt", "--out", tmp_path / "hf", "--tokenizer",
               models / "mistral", "--chat-template", "none", "--vocab-size", "301") == 1
    assert "embedding.word_embeddings.weight" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not leftovers(tmp_path)


def test_the_vocabulary_of_a_run_comes_from_its_data_manifests() -> None:
    """A run trained from scratch records no model.vocab_size: every data contract's manifest
    names its tokenizer's (pretraining tokens, SFT and preference shards alike)."""
    from trainer.config import ModelConfig

    data = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "data"
    for name, vocab in (("sample-sft", 512), ("sample-preference", 512),
                        ("sample-pretrain", 257)):
        cfg = {"data": {"manifests": [str(data / name)]}}
        assert export_hf.unpadded_vocab(ModelConfig(), cfg, None) == vocab
    assert export_hf.unpadded_vocab(ModelConfig(vocab_size=300), cfg, None) == 300
    assert export_hf.unpadded_vocab(ModelConfig(), cfg, 280) == 280
    with pytest.raises(export_hf.UsageError, match="pass --vocab-size"):
        export_hf.unpadded_vocab(ModelConfig(), {"data": {"manifests": ["/nonexistent"]}}, None)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path: Path, capsys) -> None:
    src = make_model("llama", tmp_path / "small", vocab_size=200)  # the tokenizer has 280 tokens
    assert cli(import_hf.main, src, "--out", tmp_path / "ckpt") == 1
    assert "tokenizer.json" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()


def test_kiln_generate_samples_an_import_as_transformers_does(models: Path, tmp_path: Path) -> None:
    """`kiln generate` on a `kiln import-hf` checkpoint finds the import's tokenizer.json and
    generation config itself; greedy text equals transformers' greedy generation."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.trainer.conftest import ROOT, child_env

    src = models / "llama"
    assert cli(import_hf.main, src, "--out", tmp_path / "ckpt") == 0
    prompt = "the cat sat"
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "generate", str(tmp_path / "ckpt"),
                           "--prompt", prompt, "--greedy", "--max-new-tokens", "12"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src))
    ids = tok(prompt, return_tensors="pt").input_ids
    # ids past the tokenizer's 280 (the model has 300 rows) are never sampled: they decode to
    # nothing (transformers picked one at the 12th token here)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, suppress_tokens=list(range(len(tok), 300)))
    theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert proc.stdout.rstrip("\n") == theirs


def test_export_sizes_and_refusals(models: Path, tmp_path: Path, capsys) -> None:
    assert export_hf.parse_size("5GiB") == 5 * 2**30 and export_hf.parse_size("500MB") == 5 * 10**8
    assert export_hf.parse_size("40KB") == 40_000
    with pytest.raises(export_hf.UsageError, match="4GiB"):
        export_hf.parse_size("lots")
    # a vocabulary smaller than the tokenizer (280 ids) would write a model missing their rows
    assert cli(import_hf.main, models / "llama", "--out", tmp_path / "ckpt") == 0
    assert cli(export_hf.main, tmp_path / "ckpt", "--out", tmp_path / "hf",
               "--vocab-size", "200") == 2
    assert "the tokenizer has 280 ids, the exported vocabulary 200" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
