"""Batched sampling from the trainer's megatron `GPTModel` with megatron's static KV cache, and
`kiln generate CKPT --prompt TEXT [--tp N --pp M]` to look at a checkpoint's outputs (under
torchrun with N×M processes for a model split over ranks; any saved layout loads).

KV cache: megatron-core's own `StaticInferenceContext` passed as `inference_context=` to
`GPTModel.forward`. It runs unchanged on CPU with the local layer spec (the cache buffers are
allocated on `torch.cuda.current_device()`, which the CPU backend maps to the CPU). Its decode
steps switch attention to "no mask", which would let a left-padded row attend to its padding, so
every forward here passes an explicit boolean mask (True = masked out) that hides padded keys.

Positions: RoPE rotates queries and keys by their slot in the padded buffer (megatron ignores
`position_ids` under RoPE); attention scores depend only on the distance between two slots and a
row's real tokens are contiguous, so left padding does not change what a row computes. Training
forwards (`trainer/rollout.py`) use the same layout, so their log-probs match the sampler's.

Tensor parallelism: the output layer gathers the vocabulary-parallel logits of the last position
over the TP group (`runtime_gather_output`, `[b, V]`, small), and every TP rank samples from
identical logits with an identically seeded generator, so all ranks pick the same token without
a broadcast (and stop at the same step).

Pipeline parallelism: each forward (the prompt, then one token per step) runs through megatron's
forward-only pipeline schedule, as the reference scoring of the preference stages does; each stage
keeps the KV cache of its own layers. The last stage samples and broadcasts the new tokens to the
other stages of its pipeline, so every rank ends with the same `Generation`. Under virtual
pipeline stages (several chunks per rank) each forward passes through the chunks in layer order,
one after another (`trainer.forward.forward_only` with one micro-batch); the cache is keyed by the
global layer number, so one context serves every chunk.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.utils import set_model_to_sequence_parallel

from kiln.errors import ConfigError, UsageError
from kiln.log import get_logger
from tensor_parallel import runtime
from trainer.forward import forward_only

log = get_logger(__name__)


@dataclass
class SamplingParams:
    """How the next token is picked: greedy, or temperature + top-k + top-p (nucleus) sampling."""

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut

    def check(self, prefix: str = "") -> None:
        if not self.temperature > 0:
            raise ConfigError(f"{prefix}temperature", f"must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"{prefix}top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """Left-padded prompts followed by completions, in one `[b, P + N]` buffer.

    `valid[b, t]` is False on padding (left of the prompt, and after a row stopped);
    `completion_mask[b, n]` is True on generated tokens, the stop token included.
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    prompt_length: int

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.valid[:, self.prompt_length:]

    @property
    def completions(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length:]

    def completion_ids(self) -> list[list[int]]:
        return [row[mask].tolist() for row, mask in zip(self.completions, self.completion_mask,
                                                        strict=True)]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`[b, V]` logits with everything outside the top-k and the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`
    (the token that crosses the threshold is kept), as in Holtzman et al. 2020 and HF's warper.
    """
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `[b]` from full-vocabulary logits `[b, V]`."""
    if params.greedy:
        return logits.argmax(-1)
    filtered = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens `[b, P]`, valid `[b, P]`) with each prompt right-aligned."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise UsageError("generation needs at least one prompt and no empty prompt")
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), length), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, length - len(p):] = True
    return tokens, valid


def attention_mask(valid: torch.Tensor, queries: int) -> torch.Tensor:
    """Megatron's boolean mask `[b, 1, q, k]` (True = masked) for the last `queries` of the
    `k = valid.shape[1]` slots: causal, and no real token attends to padding."""
    k = valid.shape[1]
    q_pos = torch.arange(k - queries, k, device=valid.device).unsqueeze(1)
    causal = torch.arange(k, device=valid.device).unsqueeze(0) <= q_pos  # [q, k]
    allowed = causal.unsqueeze(0) & valid.unsqueeze(1)  # [b, q, k]
    return ~allowed.unsqueeze(1)


def position_ids(valid: torch.Tensor) -> torch.Tensor:
    """Per-row positions counted from each row's first real token (0 on left padding)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP, Float16Module
        model = model.module
    return model


def _last_logits(model: list[torch.nn.Module], tokens: torch.Tensor, valid: torch.Tensor,
                 queries: int, context: StaticInferenceContext | None) -> torch.Tensor | None:
    """Full-vocabulary logits `[b, V]` of the last slot, identical on every TP rank of the last
    pipeline stage; None on the other stages. Collective over the pipeline."""
    batch = {"tokens": tokens[:, -queries:], "position_ids": position_ids(valid)[:, -queries:],
             "attention_mask": attention_mask(valid, queries)}

    def forward(chunk: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return chunk(input_ids=b["tokens"], position_ids=b["position_ids"],
                     attention_mask=b["attention_mask"], inference_context=context,
                     runtime_gather_output=True)

    out = forward_only(model, lambda: iter([batch]), 1, forward,
                       lambda logits, _: logits[:, -1, :].float(), seq_length=queries,
                       micro_batch_size=tokens.shape[0])
    return out[0] if out else None


def _sequence_parallel_settings(chunks: list[torch.nn.Module]) -> list[tuple[Any, str, Any]]:
    """(object, attribute, value) of every sequence-parallel switch `set_model_to_sequence_parallel`
    turns: the attributes it looks for on each module, and each module's config."""
    attrs = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")
    saved = []
    for chunk in chunks:
        for module in _unwrapped(chunk).modules():
            saved += [(module, a, getattr(module, a)) for a in attrs if hasattr(module, a)]
        config = _unwrapped(chunk).config
        saved.append((config, "sequence_parallel", config.sequence_parallel))
    return saved


@torch.no_grad()
def generate(model: torch.nn.Module | list[torch.nn.Module], prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, vocab_size: int, pad_id: int, stop_ids: Sequence[int] = (),
             sampling: SamplingParams | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> Generation:
    """Sample up to `max_new_tokens` after each prompt; a row stops after a token in `stop_ids`.

    `model`: this rank's model chunk, or its chunks under virtual pipelining (DDP/Float16
    wrappers are fine), the very modules the optimizer updates. `vocab_size`: the tokenizer's;
    ids in the padding of the output layer are never sampled. `generator` must be seeded
    identically on every TP rank (only the last pipeline stage draws from it). Collective over
    the model-parallel ranks.

    A model trained with sequence parallelism samples with it switched off (megatron's
    `set_model_to_sequence_parallel`, which its own inference uses): a decoding step's one token
    cannot be split over the TP ranks. It is switched back on before this returns.
    """
    sampling = sampling or SamplingParams(greedy=True)
    chunks = model if isinstance(model, list) else [model]
    inner = _unwrapped(chunks[0])
    sequence_parallel = inner.config.sequence_parallel
    device = next(inner.parameters()).device
    tokens, valid = left_pad(prompts, pad_id, device)
    prompt_length, b = tokens.shape[1], tokens.shape[0]
    total = prompt_length + max_new_tokens
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long, device=device)
    context = StaticInferenceContext(b, total) if use_cache else None
    was_training = chunks[0].training
    saved = _sequence_parallel_settings(chunks) if sequence_parallel else []
    for chunk in chunks:
        chunk.eval()
        if sequence_parallel:
            set_model_to_sequence_parallel(_unwrapped(chunk), False)
    try:
        done = torch.zeros(b, dtype=torch.bool, device=device)
        queries = prompt_length
        for _ in range(max_new_tokens):
            logits = _last_logits(chunks, tokens, valid,
                                  queries if use_cache else tokens.shape[1], context)
            if logits is not None:  # the last pipeline stage samples
                logits[:, vocab_size:] = float("-inf")
                next_ids = sample_next(logits, sampling, generator)
            else:
                next_ids = torch.empty(b, dtype=torch.long, device=device)
            runtime.broadcast_last_stage_tensor(next_ids)
            next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
            tokens = torch.cat([tokens, next_ids.unsqueeze(1)], dim=1)
            valid = torch.cat([valid, (~done).unsqueeze(1)], dim=1)
            done = done | torch.isin(next_ids, stop)
            if context is not None:
                context.sequence_len_offset += queries
                context.enable_decode_mode()
            queries = 1
            if bool(done.all()):
                break
    finally:
        for chunk in chunks:
            chunk.train(was_training)
        for owner, attr, value in saved:  # exactly as they were (megatron's toggle sets all)
            setattr(owner, attr, value)
    pad = total - tokens.shape[1]  # every row stopped early: fill the buffer to its full width
    if pad:
        tokens = torch.cat([tokens, tokens.new_full((b, pad), pad_id)], dim=1)
        valid = torch.cat([valid, valid.new_zeros((b, pad))], dim=1)
    return Generation(tokens, valid, prompt_length)


# ---- checkpoints -------------------------------------------------------------------------------

def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """A model that is never trained, ready for forwards: wrapped like the loop's chunks under
    bf16 (megatron's Float16Module casts inputs and outputs), in eval mode, without gradients."""
    if model.config.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    model.eval()
    model.requires_grad_(False)
    return model


def load_frozen(chunks: list[torch.nn.Module], path: str,
                new: tuple[str, ...] = ()) -> list[torch.nn.Module]:
    """This rank's model `chunks` with the weights of the trainer checkpoint `path` (saved under
    any layout), frozen; `new`: names of parameters the checkpoint may lack (see
    `checkpoint.load_weights`)."""
    from trainer.checkpoint import load_weights

    load_weights(chunks, path, new=new)
    return [frozen(chunk) for chunk in chunks]


# ---- kiln generate ------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kiln generate", description="Sample continuations of prompts from a trainer "
        "checkpoint (any stage but rm, saved under any layout) with megatron's static KV cache.")
    parser.add_argument("checkpoint", help="a checkpoint directory, or a checkpoints root (its latest)")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text (repeatable: one batch)")
    parser.add_argument("--tokenizer", help="a `kiln tokenizer` or Hugging Face tokenizer "
                        "directory; default: the one the run config names (<stage>.tokenizer), "
                        "else that of the `kiln import-hf` model the run started from")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true")
    mode.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as one user turn and open the assistant's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks (launch tp×pp processes with torchrun)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages")
    return parser.parse_args(argv)


def run(checkpoint: str, prompts: Sequence[str], *, tokenizer: str | None, chat: bool,
        max_new_tokens: int, sampling: SamplingParams, seed: int, tp: int = 1,
        pp: int = 1) -> list[str] | None:
    """Decoded continuations of `prompts` by the policy stored in a trainer checkpoint (saved
    under any layout), loaded over `tp` × `pp` ranks: on the last rank, None on the others."""
    import yaml
    from megatron.core import dist_checkpointing

    from kiln.config import from_dict
    from trainer.checkpoint import resolve
    from trainer.config import RunConfig
    from trainer.hf.export_hf import tokenizer_dir
    from trainer.model import build_gpt_chunks, check_fits_layout
    from trainer.text_tokenizer import TextTokenizer

    try:
        path = resolve(checkpoint)
    except ConfigError as exc:  # the positional argument, not a config key
        raise UsageError(str(exc).split(": ", 1)[1]) from None
    saved = dist_checkpointing.load_common_state_dict(path).get("config")
    if saved is None:
        raise UsageError(f"{path} holds no run config (not written by trainer/main.py)")
    run_cfg = yaml.safe_load(saved)
    stage = run_cfg.get("stage")
    if stage == "rm":
        raise UsageError(f"{path} is a reward model: it scores text, it has no LM head to sample")
    # the run's `kiln tokenizer` directory, else the tokenizer of the import it started from
    tok_dir = tokenizer or (run_cfg.get(stage) or {}).get("tokenizer") or tokenizer_dir(path)
    if not tok_dir or not os.path.isdir(tok_dir):
        raise UsageError("no tokenizer: pass --tokenizer DIR (a `kiln tokenizer` directory, or "
                         "a Hugging Face one with tokenizer.json)")
    tok = TextTokenizer(tok_dir)
    cfg = RunConfig(model=from_dict(RunConfig, {"model": run_cfg["model"]}).model)
    cfg.train.seq_length = run_cfg.get("train", {}).get("seq_length", cfg.train.seq_length)
    vocab = dist_checkpointing.load_tensors_metadata(path)[
        "embedding.word_embeddings.weight"].global_shape[0]
    if tok.vocab_size > vocab:
        raise UsageError(f"{tok_dir} has {tok.vocab_size} tokens, more than the model's "
                         f"{vocab} embedding rows: not this model's tokenizer")
    stops = tok.stop_ids(chat)
    encoded = [tok.encode(p, chat) for p in prompts]
    longest = max(map(len, encoded)) + max_new_tokens
    if longest > cfg.train.seq_length:
        log.warning("prompt + %d new tokens reach %d positions, past the %d the model was "
                    "trained on", max_new_tokens, longest, cfg.train.seq_length)
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise UsageError(f"--tp {tp} × --pp {pp} runs on {tp * pp} processes, this is {world}: "
                         f"launch with torchrun --nproc-per-node {tp * pp} -m kiln.cli generate")
    runtime.init(tp=tp, pp=pp, seed=seed)
    try:
        try:
            check_fits_layout(cfg.model, cfg.train.seq_length, sequence_parallel=False)
        except ConfigError as exc:
            raise _flag_error(exc) from None
        model = load_frozen(build_gpt_chunks(cfg, vocab), path)
        gen = generate(model, encoded, max_new_tokens=max_new_tokens, vocab_size=tok.vocab_size,
                       pad_id=tok.pad_id, stop_ids=stops,
                       sampling=sampling, generator=torch.Generator().manual_seed(seed))
        last = runtime.is_logging_rank()
    finally:
        runtime.shutdown()
    if not last:
        return None
    return [tok.decode([t for t in ids if t not in stops]) for ids in gen.completion_ids()]


def _flag_error(exc: ConfigError) -> UsageError:
    """A config check's error told as the command-line flag it came from (`top_p` -> --top-p,
    `parallel.tp` -> --tp)."""
    flag = exc.key.split(".")[-1].replace("_", "-")
    return UsageError(f"--{flag} {str(exc).split(': ', 1)[1]}")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    sampling = SamplingParams(greedy=args.greedy, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
    try:
        sampling.check()
    except ConfigError as exc:
        raise _flag_error(exc) from None
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--tp", args.tp),
                        ("--pp", args.pp)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1")
    texts = run(args.checkpoint, args.prompt, tokenizer=args.tokenizer, chat=args.chat,
                max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                tp=args.tp, pp=args.pp)
    for text in texts or ():
        print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kiln.cli import entry

    sys.exit(entry(main))
