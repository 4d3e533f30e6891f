"""Core attention through `torch.nn.functional.scaled_dot_product_attention` for the local spec.

megatron's local `DotProductAttention` materialises the `[b, n, s, s]` scores (baddbmm, masked
softmax, bmm) and copies K/V once per query head under grouped-query attention; on GPU
Transformer Engine replaces it with fused kernels. Off TE (the CPU runs) this module is the fused
path: torch's SDPA picks its flash kernel, never materialises the scores for causal attention and
reads the K/V groups in place (`enable_gqa`). Same inputs, outputs and semantics as megatron's:

- query `[sq, b, np, hn]`, key/value `[sk, b, ng, hn]` -> context `[sq, b, np·hn]`;
- no mask with `AttnMaskType.causal`: causal when `sq == sk`, all keys for one-token decode steps;
- an explicit boolean mask `[b or 1, 1, sq, sk]` (True = masked) as megatron fills it: -10000
  before the softmax, so a fully masked query row (left padding in generation) stays finite;
- packed sequences (`PackedSeqParams`, THD: query `[t, np, hn]` -> `[t, np·hn]`), which megatron
  only runs through Transformer Engine: causal attention within each `cu_seqlens` segment. The
  packed SFT path then runs, and is tested, on CPU exactly as it runs under TE on GPU;
- context parallelism, which megatron also only runs through TE: each CP rank holds two of the
  sequence's 2·cp chunks (chunk r and 2·cp-1-r, megatron's load-balanced split,
  `get_batch_on_this_cp_rank`), gathers K and V from the CP group (TE's `all_gather` comm type;
  the backward reduce-scatters their gradients) and attends with its queries' global positions.
  The causal mask over those positions is materialised, `[s/cp, s]`, once for all layers: this
  is the exact, testable path; long contexts on GPU want TE's kernels, which need no mask.

Anything else (learnable/off-by-one softmax, sliding windows, query-key layer scaling,
chunked causal prefill) goes to
megatron's own implementation.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention

from tensor_parallel.runtime import cp_token_positions

# what megatron's `attention_mask_func` writes into masked scores
_MASKED_SCORE = -10000.0


# The last boolean mask converted, and its additive form: every layer of a forward gets the same
# mask, so it is converted once and saved for backward once, not once per layer.
_last_mask: tuple[torch.Tensor, int, torch.dtype, torch.Tensor] | None = None


def _additive_mask(masked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`masked` (True = masked out) as scores to add: 0, or megatron's -10000."""
    global _last_mask
    if _last_mask is not None:
        source, version, kind, additive = _last_mask
        if source is masked and version == masked._version and kind == dtype:
            return additive
    additive = torch.zeros(masked.shape, dtype=dtype, device=masked.device)
    additive.masked_fill_(masked, _MASKED_SCORE)
    _last_mask = (masked, masked._version, dtype, additive)
    return additive


@functools.lru_cache(maxsize=4)
def _cp_layout(cp: int, rank: int, local: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where this CP rank's tokens sit in the sequence, built once for every layer.

    Rank j holds global chunks j and 2cp-1-j of 2cp (megatron's load-balanced split). Returns the
    rows that put K/V gathered in rank order back in position order, and the causal mask
    `[1, 1, s/cp, s]` (True where a key comes after the query) of this rank's queries.
    """
    gathered = torch.cat([cp_token_positions(cp, j, local) for j in range(cp)])
    rows = torch.argsort(gathered)  # gathered[rows] is 0, 1, ..., cp·local - 1
    mine = cp_token_positions(cp, rank, local)
    masked = torch.arange(cp * local)[None, :] > mine[:, None]
    return rows.to(device), masked.to(device)[None, None]


class SdpaDotProductAttention(DotProductAttention):
    """megatron's `DotProductAttention` contract on `scaled_dot_product_attention`."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        # megatron's class refuses context parallelism (its own attention has no CP path); this
        # one has, so its parent is built as for CP=1
        cp, config.context_parallel_size = config.context_parallel_size, 1
        try:
            super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        finally:
            config.context_parallel_size = cp
        self._fused = (config.softmax_type == "vanilla" and not config.apply_query_key_layer_scaling
                       and not is_layer_window_attention(config.window_size,
                                                         config.window_attn_skip_freq,
                                                         max(1, layer_number)))
        self.cp_group = parallel_state.get_context_parallel_group() if cp > 1 else None
        if self.cp_group is not None and not self._fused:
            raise ValueError("context parallelism on the local spec needs plain softmax attention "
                             "(no sliding window, learnable softmax or query-key layer scaling)")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        if self.cp_group is not None:
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("context parallelism with packed sequences (THD) or an attention "
                                 "bias needs Transformer Engine")
            return self._context_parallel(query, key, value, attention_mask)
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        sq, sk = query.shape[0], key.shape[0]
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1
        if not self._fused or attention_bias is not None or (causal and sq != sk):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        return self._attend(query, key, value, attention_mask, causal)

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                params: PackedSeqParams) -> torch.Tensor:
        if params.qkv_format != "thd" or not self._fused:
            raise ValueError(f"packed sequences in {params.qkv_format!r} format with "
                             f"softmax {self.config.softmax_type!r} need Transformer Engine")

        def bounds(padded: torch.Tensor | None, plain: torch.Tensor, total: int):
            cu = (padded if padded is not None else plain).long()
            segment = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)
            # offset from the segment's end: causal masks align segments at their last token,
            # as TE's do when a query segment is shorter than its key segment
            return segment, torch.arange(total, device=cu.device) - cu[segment + 1]

        seg_q, pos_q = bounds(params.cu_seqlens_q_padded, params.cu_seqlens_q, query.shape[0])
        seg_kv, pos_kv = bounds(params.cu_seqlens_kv_padded, params.cu_seqlens_kv, key.shape[0])
        t_q, t_kv = query.shape[0], key.shape[0]
        masked = (seg_q[:, None] != seg_kv[None, :]) | (pos_kv[None, :] > pos_q[:, None])
        # [t, heads, hn] -> [t, 1, heads, hn]: one row holding every segment
        context = self._attend(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1),
                               masked.view(1, 1, t_q, t_kv), causal=False)
        return context.view(t_q, -1)

    def _context_parallel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Local queries `[s/cp, b, np, hn]` against the whole sequence's keys and values."""
        rows, causal = _cp_layout(self.cp_group.size(), self.cp_group.rank(), query.shape[0],
                                  query.device)

        def gathered(t: torch.Tensor) -> torch.Tensor:
            full = tensor_parallel.gather_from_sequence_parallel_region(
                t.contiguous(), tensor_parallel_output_grad=True, group=self.cp_group)
            return full.index_select(0, rows)

        key, value = gathered(key), gathered(value)
        if attention_mask is None:  # causal over global positions
            attention_mask = causal
        # an explicit mask already holds these queries' rows over every key
        # (`get_batch_on_this_cp_rank` splits masks along the query dimension only)
        return self._attend(query, key, value, attention_mask, causal=False)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        sq = query.shape[0]
        mask = None
        if attention_mask is not None:
            mask = _additive_mask(attention_mask, query.dtype)
        # [s, b, heads, hn] -> [b, heads, s, hn] laid out as [b, s, heads, hn]: the CPU flash
        # kernel runs forward and backward ~15% faster on that layout than on megatron's
        # [s, b] strides, copy included
        q, k, v = (t.transpose(0, 1).contiguous().transpose(1, 2) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if (
                dropout and not self.config.sequence_parallel) else contextlib.nullcontext():
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        # [b, np, sq, hn] -> [sq, b, np·hn]
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1], self.hidden_size_per_partition)

